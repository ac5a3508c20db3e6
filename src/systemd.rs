//! The systemd notify protocol (READY, WATCHDOG, RELOADING, STOPPING). Not built yet.
