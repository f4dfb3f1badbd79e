"""Performance tools: `bench` (timed train steps, MFU) and `plan` (ahead-of-time memory and
mesh search). The peak table both use is train/peak.py (the train loop reports MFU too)."""
