"""Errors meant for people: the CLI prints them as one message and exits 2."""


class UserError(Exception):
    """Bad input (config, files, mesh...). The message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, type or value is wrong."""


# Exit code meaning "stopped cleanly after a checkpoint; run me again to continue" (sysexits'
# EX_TEMPFAIL). Launch scripts requeue a job that exits with it (SIGTERM, train.max_time).
REQUEUE_EXIT_CODE = 75


class Preempted(Exception):
    """Training stopped early (SIGTERM/SIGINT or train.max_time) after a durable checkpoint.

    Not an error: the CLI prints the message and exits with REQUEUE_EXIT_CODE so a launcher
    runs the same command again, which resumes from that checkpoint."""

    exit_code = REQUEUE_EXIT_CODE
