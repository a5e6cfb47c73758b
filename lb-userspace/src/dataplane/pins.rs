//! Loading with pins: maps, links and programs pinned in bpffs outlive the
//! daemon, and the next daemon adopts them. Also what a pin directory is
//! (bpffs, which mount namespace) and how it is emptied.

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, MapData},
    EbpfLoader,
};
use lb_common::maps as names;
use serde::Serialize;

use super::{program_object, Dataplane, DataplaneError, Result, LAYOUT_VERSION};

impl Dataplane {
    /// Loads the program with its maps pinned under `dir` (bpffs, mounted if
    /// needed). Maps pinned there by an earlier daemon are adopted, with
    /// their contents, unless `fresh`, which removes them first. Returns the
    /// data path and whether it adopted earlier state.
    pub fn load_pinned(
        dir: &Path,
        fresh: bool,
        conntrack_size: u32,
        transient_size: u32,
    ) -> Result<(Dataplane, bool)> {
        let pins = |problem: String| DataplaneError::Pins {
            dir: dir.to_owned(),
            problem,
        };
        ensure_bpffs(dir).map_err(|p| pins(p.0))?;
        if fresh {
            remove_pins(dir)?;
        }
        std::fs::create_dir_all(dir).map_err(|e| pins(format!("creating it: {e}")))?;
        let layout_pin = dir.join("LAYOUT");
        let adopted = layout_pin.exists();
        if adopted {
            let m = MapData::from_pin(&layout_pin).map_err(|e| pins(format!("LAYOUT: {e}")))?;
            let a: Array<_, u64> = Array::try_from(aya::maps::Map::Array(m))
                .map_err(|e| pins(format!("LAYOUT: {e}")))?;
            let v = a.get(&0, 0).map_err(|e| pins(format!("LAYOUT: {e}")))?;
            if v != LAYOUT_VERSION {
                return Err(pins(format!(
                    "its maps have layout {v}, this build uses {LAYOUT_VERSION}: they cannot be \
                     adopted; start with `lb run --fresh` (established flows will be lost)"
                )));
            }
        }
        if adopted {
            // A pinned map is reused as it is: its size must be the one asked.
            for (map, asked, key) in [
                (names::CONNTRACK, conntrack_size, "conntrack_size"),
                (names::TRANSIENT, transient_size, "transient_size"),
            ] {
                let have = aya::maps::MapInfo::from_pin(dir.join(map))
                    .map_err(|e| pins(format!("{map}: {e}")))?
                    .max_entries();
                if have != asked {
                    return Err(pins(format!(
                        "its {map} table has {have} entries and the config asks for {asked} \
                         ([daemon] {key}): keep the size, or start with `lb run --fresh` \
                         (established flows will be lost)"
                    )));
                }
            }
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::CONNTRACK, conntrack_size)
            .map_max_entries(names::REVERSE, conntrack_size)
            .map_max_entries(names::TRANSIENT, transient_size);
        let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|m| (*m, dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        if std::env::var_os("LB_XDP_OBJECT").is_some() {
            tracing::info!(object = ?std::env::var_os("LB_XDP_OBJECT"), "loading the XDP object from LB_XDP_OBJECT");
        }
        let ebpf = loader
            .load(&program_object()?)
            .map_err(DataplaneError::Load)?;
        let mut dp = Dataplane::finish_load(conntrack_size, ebpf, Some(dir.to_owned()), adopted)?;
        if !adopted {
            write_layout(&layout_pin).map_err(|p| pins(p.0))?;
        }
        // The running program, pinned for inspection (`bpftool prog show pinned`);
        // the links hold it attached either way.
        let prog_pin = dir.join("prog-lb");
        let _ = std::fs::remove_file(&prog_pin);
        dp.program_mut()
            .pin(&prog_pin)
            .map_err(|e| pins(format!("pinning the program: {e}")))?;
        let tc_pin = dir.join("prog-lb_tc");
        let _ = std::fs::remove_file(&tc_pin);
        dp.tc_program_mut()
            .pin(&tc_pin)
            .map_err(|e| pins(format!("pinning the TC program: {e}")))?;
        Ok((dp, adopted))
    }
}

/// What is wrong with the pin directory (the error names the directory).
struct Problem(String);

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf if `dir` is not on a bpffs yet.
fn ensure_bpffs(dir: &Path) -> std::result::Result<(), Problem> {
    let on_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: c is a valid path and st a valid out-parameter.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Err(Problem(
            "the pin directory must be under /sys/fs/bpf".into(),
        ));
    }
    if on_bpffs(root) {
        return Ok(());
    }
    let _ = std::fs::create_dir_all(root);
    // SAFETY: all arguments are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Problem(format!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Whether what is pinned under `dir` outlives this process.
#[derive(Debug, Clone, Serialize)]
pub struct Persistence {
    /// None when it could not be told (no process of the host's mounts to
    /// compare with was readable).
    pub survives_restart: Option<bool>,
    pub why: String,
}

/// Pins outlive the daemon when the bpffs they are on is the one the host
/// sees at the same path: the one our parent (a shell, a service manager,
/// or PID 1) sees. Started under `ip netns exec`, which gives the process a
/// private mount namespace with a fresh /sys, the daemon mounts a bpffs of its
/// own there, which dies with it.
pub fn persistence(dir: &Path) -> Persistence {
    use std::os::unix::fs::MetadataExt;
    let private = |why: String| Persistence {
        survives_restart: Some(false),
        why,
    };
    let ours = match std::fs::metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) => return private(format!("{}: {e}", dir.display())),
    };
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    for pid in [parent, 1] {
        let theirs = Path::new("/proc")
            .join(pid.to_string())
            .join("root")
            .join(rel);
        match std::fs::metadata(&theirs) {
            Ok(m) if m.dev() == ours => {
                return Persistence {
                    survives_restart: Some(true),
                    why: format!(
                        "pins in {} are on the bpffs the host sees (as process {pid} does)",
                        dir.display()
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => continue,
            _ => {
                return private(format!(
                    "{} is on a bpffs private to this daemon's mount namespace (started with \
                     `ip netns exec`?): its pins, and with them the data path, end with the \
                     daemon. Run `lb run --netns NAME` (or [daemon] netns), which enters only \
                     the network namespace",
                    dir.display()
                ))
            }
        }
    }
    Persistence {
        survives_restart: None,
        why: "no process with the host's mounts could be read to compare with".into(),
    }
}

/// Removes every pin in `dir` (maps, links) and the directory: whatever was
/// attached through a removed link pin detaches once no process holds it.
pub fn remove_pins(dir: &Path) -> Result<()> {
    let pins = |problem: String| DataplaneError::Pins {
        dir: dir.to_owned(),
        problem,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(pins(format!("reading it: {e}"))),
    };
    // Only what this program pins: anything else there is someone else's.
    let ours = |name: &str| {
        names::ALL.contains(&name)
            || name == "LAYOUT"
            || name == "prog-lb"
            || name == "prog-lb_tc"
            || name.starts_with("link-")
    };
    for e in entries.flatten() {
        if !e.file_name().to_str().is_some_and(ours) {
            continue;
        }
        std::fs::remove_file(e.path())
            .map_err(|err| pins(format!("removing {}: {err}", e.path().display())))?;
    }
    // Left in place if anything else lives there.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Creates the LAYOUT pin: a one-entry array holding [`LAYOUT_VERSION`].
fn write_layout(pin: &Path) -> std::result::Result<(), Problem> {
    let mut a = Array::<MapData, u64>::create(1, 0)
        .map_err(|e| Problem(format!("creating LAYOUT: {e}")))?;
    a.set(0, LAYOUT_VERSION, 0)
        .map_err(|e| Problem(format!("LAYOUT: {e}")))?;
    a.pin(pin)
        .map_err(|e| Problem(format!("pinning LAYOUT: {e}")))
}
