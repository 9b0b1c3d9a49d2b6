//! The integration tests: one binary, one module per suite, the helpers in `support`. Each suite
//! starts the real server (or the real binary) on a temp data dir.

mod support;

mod admin;
mod catalog;
mod cli;
mod clock;
mod crash;
mod disk;
mod faults;
mod flow;
mod handshake;
mod hostile;
mod idempotent;
mod imports;
mod integrity;
mod layers;
mod pace;
mod powercut;
mod powerloss;
mod publish;
mod relay;
mod retention;
mod security;
mod shutdown;
mod siege;
mod subscribe;
mod young;
