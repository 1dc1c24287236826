//! Shared test support, used by several integration-test files through
//! `mod support;`. Not every file uses every helper.
#![allow(dead_code)]

pub mod https;
pub mod idp;
pub mod kube;
pub mod kubectl;
pub mod nginx;
pub mod pg;
pub mod relay;
