//! Integration tests: the real binary against real etcd on loopback, with fake Juju hook
//! tools that follow shared/juju-contract.md. etcd must be installed (scripts/install-deps);
//! a missing etcd fails the tests, it never skips them.

mod util;

mod charm;
mod crash;
mod encryption;
mod errors;
mod hardening;
mod hardening3;
mod hardening4;
mod health;
mod hooktools;
mod hostile;
mod lifecycle;
mod matrix;
mod pitr;
mod progress;
mod restore;
mod revision;
mod s3;
mod selective;
mod snapshot;
mod standalone;
mod stores;
