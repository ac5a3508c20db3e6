//! The engine's rules, in process: a scripted portal, in-memory destinations and scripted dependents
//! (feature `testing`, src/testing/), under tokio's paused clock. Each test runs in milliseconds and
//! nothing listens on a socket. What needs a real OpenBao, moto, simulator or process boundary lives in
//! the end-to-end tests (tests/README.md).
#![cfg(feature = "testing")]

mod approval;
mod dual;
mod first_contact;
mod fixture;
mod matrix;
mod notices;
mod races;
mod rules;
mod table;
mod window;
