//! Integration tests: real etcd, fake Juju hook tools.
