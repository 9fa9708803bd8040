//! `cargo xtask image`: the container image, built with podman (no daemon,
//! no registry) from `deploy/container/Dockerfile` on an empty base: the
//! static binary and the example configuration. Also saved as an archive
//! that `docker load` and `podman load` read.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{
    cmd::{output, quiet, workspace_root},
    package::{static_binary, PACKAGE},
};

/// The image's name in podman's local store.
pub const NAME: &str = "localhost/activesync-monitor";

/// A built image.
pub struct Image {
    /// `localhost/activesync-monitor:<version>`.
    pub reference: String,
    /// Its size as podman reports it (uncompressed layers).
    pub bytes: u64,
    /// `target/image/activesync-monitor_<version>.tar` (docker-archive).
    pub archive: PathBuf,
}

/// Stage the context, build the image, save it as an archive.
pub fn build() -> Result<Image> {
    let bin = static_binary()?;
    let ws = workspace_root();
    let out = ws.join("target/image");
    let ctx = out.join("context");
    if ctx.exists() {
        fs::remove_dir_all(&ctx).with_context(|| format!("removing {}", ctx.display()))?;
    }
    fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    for (from, to) in [
        (bin, "monitor"),
        (ws.join("deploy/monitor.toml"), "monitor.toml"),
        (ws.join("deploy/container/Dockerfile"), "Dockerfile"),
    ] {
        fs::copy(&from, ctx.join(to))
            .with_context(|| format!("copying {} into the image context", from.display()))?;
    }
    let version = env!("CARGO_PKG_VERSION");
    let reference = format!("{NAME}:{version}");
    quiet(
        Command::new("podman")
            .args(["build", "--quiet", "--tag", &reference, "--file"])
            .arg(ctx.join("Dockerfile"))
            .arg(&ctx),
    )
    .context("building the image with podman")?;
    let size = output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &reference,
    ]))?;
    let bytes = size
        .trim()
        .parse()
        .with_context(|| format!("reading the image's size from {size:?}"))?;
    let archive = out.join(format!("{PACKAGE}_{version}.tar"));
    let _ = fs::remove_file(&archive);
    quiet(
        Command::new("podman")
            .args(["save", "--quiet", "--format", "docker-archive", "--output"])
            .arg(&archive)
            .arg(&reference),
    )
    .context("saving the image as an archive")?;
    Ok(Image {
        reference,
        bytes,
        archive,
    })
}
