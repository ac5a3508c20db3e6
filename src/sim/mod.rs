//! Simulators of the portal and of a dependent, for tests and the demo.
