//! Empty on purpose (as in aya-template): `monitor` lists this crate as a
//! build-dependency, so a change here or in `monitor-common` (the shared
//! state machine) reruns `monitor`'s build script, which rebuilds the
//! kernel programs (`src/main.rs`) with aya-build.
#![no_std]
