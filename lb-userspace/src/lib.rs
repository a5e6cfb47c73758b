//! The load balancer daemon's library: config, data path, control API.
//! The `lb` binary is a thin command line over it; the test suites use it too.

pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod health;
pub mod iface;
pub mod lock;
pub mod metrics;
pub mod mysql;
pub mod nexthop;
pub mod reconcile;
pub mod web;
