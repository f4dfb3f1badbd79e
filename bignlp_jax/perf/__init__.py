"""Performance tools: `bench` (timed train steps, MFU), `plan` (ahead-of-time memory and mesh
search), and the accelerator peak table both use."""
