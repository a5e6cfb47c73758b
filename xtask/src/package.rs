//! `cargo xtask package`: a Debian package of lb, built from a release build:
//! the binary, the systemd unit, the example configs, the README and a man
//! page made from the command line's own help.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::{build_all, cmd, root, run};

/// Builds target/debian/lb_VERSION_ARCH.deb and returns its path.
pub fn package() -> Result<PathBuf> {
    build_all()?;
    build_package(&root().join("target/release/lb"))
}

/// Packs `lb` (a built binary) with the rest of the package's files.
pub fn build_package(lb: &Path) -> Result<PathBuf> {
    let root = root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let out_dir = root.join("target/debian");
    let stage = out_dir.join(format!("lb_{version}_{arch}"));
    let _ = std::fs::remove_dir_all(&stage);
    let put = |rel: &str, from: &Path, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = stage.join(rel);
        std::fs::create_dir_all(to.parent().expect("a file in a directory"))?;
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("usr/bin/lb", lb, 0o755)?;
    put(
        "lib/systemd/system/lb.service",
        &root.join("packaging/lb.service"),
        0o644,
    )?;
    for example in [
        "seed.toml",
        "demo.toml",
        "mysql-monitor.pass",
        "prometheus.yml",
    ] {
        put(
            &format!("usr/share/doc/lb/examples/{example}"),
            &root.join("config").join(example),
            0o644,
        )?;
    }
    put("usr/share/doc/lb/README.md", &root.join("README.md"), 0o644)?;
    // The man page, from the binary's own help.
    let man = std::process::Command::new(lb)
        .arg("manpage")
        .output()
        .context("running lb manpage")?;
    if !man.status.success() || man.stdout.is_empty() {
        bail!(
            "lb manpage failed: {}",
            String::from_utf8_lossy(&man.stderr)
        );
    }
    let man_dir = stage.join("usr/share/man/man1");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::write(man_dir.join("lb.1"), &man.stdout)?;
    run(cmd(
        "gzip",
        &["-9n", man_dir.join("lb.1").to_str().expect("utf-8 path")],
    )
    .current_dir(&root))?;
    let size_kib = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: lb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lb developers <lb@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6, iproute2\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://example.invalid/lb\n\
         Description: kernel-accelerated layer-4 load balancer (XDP and TC)\n \
         lb balances TCP and UDP services across backends from an eBPF data path\n \
         at XDP or TC ingress, health-checks them, follows MySQL failover and\n \
         survives its own restarts. Run it with the lb.service unit.\n"
    );
    std::fs::create_dir_all(stage.join("DEBIAN"))?;
    std::fs::write(stage.join("DEBIAN/control"), control)?;
    let deb = out_dir.join(format!("lb_{version}_{arch}.deb"));
    run(cmd(
        "dpkg-deb",
        &[
            "--build",
            "--root-owner-group",
            stage.to_str().expect("utf-8 path"),
            deb.to_str().expect("utf-8 path"),
        ],
    )
    .current_dir(&root))?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
