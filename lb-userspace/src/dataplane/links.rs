//! The interfaces the data path runs on: attaching at a hook, taking over
//! the links an earlier daemon pinned, and letting them go.

use std::path::{Path, PathBuf};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, SchedClassifierLinkId},
    xdp::{XdpLink, XdpLinkId},
    ProgramError, TcAttachType, XdpMode as AyaXdpMode,
};
use lb_common::{maps as names, IFACE_F_PEER, MAX_IFINDEX};
use serde::Serialize;

use super::{maps::map_err, Dataplane, DataplaneError, Result};
use crate::{config::Hook, iface};

/// An interface the data path runs on, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub interface: String,
    /// The hook: `xdp` (native), `xdp-generic` or `tc`.
    pub hook: &'static str,
    /// The older name of the same (`native`, `generic` or `tc`).
    pub mode: &'static str,
    /// Why this hook.
    pub reason: String,
    /// Taken over from an earlier daemon (the link was pinned).
    pub adopted: bool,
}

/// A hook's status names: (`hook`, `mode`).
fn hook_names(h: Hook) -> (&'static str, &'static str) {
    match h {
        Hook::Xdp => ("xdp", "native"),
        Hook::XdpGeneric => ("xdp-generic", "generic"),
        Hook::Tc => ("tc", "tc"),
        Hook::Auto => ("auto", "auto"),
    }
}

pub(super) enum Link {
    /// Owned by the XDP program: detached when it is dropped.
    Owned(XdpLinkId),
    /// Owned by the TC program: detached when it is dropped.
    OwnedTc(SchedClassifierLinkId),
    /// Pinned in bpffs: outlives the daemon until unpinned.
    Pinned { fd: FdLink, pin: PathBuf },
}

impl Dataplane {
    /// Runs the data path on `iface` at the hook `asked` for (`auto`: chosen
    /// by what the interface is, see `iface::choose`); refuses a hook that
    /// cannot forward correctly there. With a pin directory, a link an
    /// earlier daemon pinned for `iface` is taken over when it is of the
    /// chosen kind: this program replaces the old one on it atomically (no
    /// packet goes unprocessed). A pinned link of the other kind is replaced
    /// after the new one is attached. The new link is pinned.
    pub fn attach(&mut self, iface: &str, asked: Hook) -> Result<Attachment> {
        let hook_err = |problem: String| DataplaneError::Hook {
            iface: iface.to_owned(),
            problem,
        };
        let facts = iface::facts(iface, asked)
            .map_err(|e| hook_err(format!("cannot read what the interface is: {e}")))?;
        let mut choice = iface::choose(iface, asked, &facts)?;
        // Before any link: the first packet already knows how to leave.
        self.set_iface_flags(iface, &facts)?;
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link-{iface}")));
        let mut replaced = None;
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            match self.adopt_link(iface, pin, choice.hook) {
                Ok(Some(hook)) => {
                    let (hook, mode) = hook_names(hook);
                    let a = Attachment {
                        interface: iface.to_owned(),
                        hook,
                        mode,
                        reason: choice.reason,
                        adopted: true,
                    };
                    self.attached.last_mut().expect("adopt_link pushed it").0 = a.clone();
                    return Ok(a);
                }
                // Of the other kind: attach the new hook first, then let the
                // old link go, so no packet passes unprocessed.
                Ok(None) => replaced = Some(pin.clone()),
                // The interface it was attached to is gone (removed, or its
                // namespace deleted): the pin is stale; attach afresh.
                Err(e) => {
                    tracing::warn!(iface, pin = %pin.display(), error = %e, "the pinned link cannot be taken over; attaching afresh");
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        if let Some(old) = &replaced {
            // The new link takes the pin's name once it is attached.
            let _ = std::fs::rename(old, old.with_extension("replaced"));
        }
        let attached = self.attach_new(iface, &mut choice);
        if let Some(old) = &replaced {
            let moved = old.with_extension("replaced");
            if attached.is_ok() {
                let _ = std::fs::remove_file(&moved);
            } else {
                let _ = std::fs::rename(&moved, old);
            }
        }
        let link = attached?;
        let link = match &pin {
            None => link,
            Some(pin) => {
                let (name, _) = hook_names(choice.hook);
                let attach_err = |source| DataplaneError::Attach {
                    iface: iface.to_owned(),
                    mode: name,
                    source,
                };
                let fd = self.take_fd_link(link).map_err(attach_err)?;
                let pinned = fd.pin(pin).map_err(|e| DataplaneError::Pins {
                    dir: pin.clone(),
                    problem: format!("pinning the link: {e}"),
                })?;
                // Keep our handle; the pin stays until removed.
                Link::Pinned {
                    fd: pinned.into(),
                    pin: pin.clone(),
                }
            }
        };
        let (hook, mode) = hook_names(choice.hook);
        let a = Attachment {
            interface: iface.to_owned(),
            hook,
            mode,
            reason: choice.reason,
            adopted: false,
        };
        self.attached.push((a.clone(), link));
        Ok(a)
    }

    /// Attaches a new link at `choice.hook`. A NIC whose driver has no
    /// native XDP gets TC when the choice was automatic (the reason says so).
    fn attach_new(&mut self, iface: &str, choice: &mut iface::Choice) -> Result<Link> {
        let attach_err = |mode, source| DataplaneError::Attach {
            iface: iface.to_owned(),
            mode,
            source,
        };
        match choice.hook {
            Hook::Xdp | Hook::XdpGeneric => {
                let (aya_mode, name) = if choice.hook == Hook::Xdp {
                    (AyaXdpMode::Driver, "native XDP")
                } else {
                    (AyaXdpMode::Skb, "generic XDP")
                };
                match self.program_mut().attach(iface, aya_mode) {
                    Ok(id) => Ok(Link::Owned(id)),
                    Err(source) if choice.reason.starts_with("auto") => {
                        tracing::info!(iface, error = %source, "no native XDP here; using TC");
                        choice.hook = Hook::Tc;
                        choice.reason = format!(
                            "auto: a NIC whose driver cannot run native XDP ({source}): TC"
                        );
                        self.attach_new(iface, choice)
                    }
                    Err(source) => Err(attach_err(name, source)),
                }
            }
            Hook::Tc | Hook::Auto => {
                // The clsact qdisc is only needed by the older netlink
                // attachment; TCX links (kernel 6.6+) need none.
                let id = self
                    .tc_program_mut()
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(|source| attach_err("TC ingress", source))?;
                Ok(Link::OwnedTc(id))
            }
        }
    }

    /// Marks in `IFACES` how the TC hook sends out of `iface`.
    fn set_iface_flags(&mut self, iface: &str, facts: &iface::Facts) -> Result<()> {
        let Some(index) = iface::if_index(iface).filter(|&i| i < MAX_IFINDEX) else {
            return Ok(());
        };
        let flags = if facts.veth.as_ref().is_some_and(|p| p.elsewhere) {
            IFACE_F_PEER
        } else {
            0
        };
        let a = &mut self.maps.ifaces;
        if a.get(&index, 0).map_err(map_err(names::IFACES))? != flags {
            a.set(index, flags, 0).map_err(map_err(names::IFACES))?;
        }
        Ok(())
    }

    /// Takes over the link pinned at `pin` if it is of the kind `hook` needs
    /// (XDP or TCX): this program replaces the old one on it atomically.
    /// Returns the hook it runs at, or None when the pinned link is of the
    /// other kind (left as it is).
    fn adopt_link(&mut self, iface: &str, pin: &Path, hook: Hook) -> Result<Option<Hook>> {
        let pins = |problem: String| DataplaneError::Pins {
            dir: pin.to_owned(),
            problem,
        };
        let open = || -> Result<FdLink> {
            Ok(PinnedLink::from_pin(pin)
                .map_err(|e| pins(e.to_string()))?
                .into())
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            mode: "the adopted link",
            source,
        };
        let (used, link) = match XdpLink::try_from(open()?) {
            Ok(xdp_link) => {
                if hook == Hook::Tc {
                    return Ok(None);
                }
                let used = xdp_mode_of(iface);
                let id = self
                    .program_mut()
                    .attach_to_link(xdp_link)
                    .map_err(attach_err)?;
                (used, Link::Owned(id))
            }
            Err(_) => {
                let tc_link = SchedClassifierLink::try_from(open()?)
                    .map_err(|e| pins(format!("neither an XDP nor a TCX link: {e}")))?;
                if hook != Hook::Tc {
                    return Ok(None);
                }
                let id = self
                    .tc_program_mut()
                    .attach_to_link(tc_link)
                    .map_err(attach_err)?;
                (Hook::Tc, Link::OwnedTc(id))
            }
        };
        let fd = self.take_fd_link(link).map_err(attach_err)?;
        let (h, mode) = hook_names(used);
        self.attached.push((
            Attachment {
                interface: String::new(),
                hook: h,
                mode,
                reason: String::new(),
                adopted: true,
            },
            Link::Pinned {
                fd,
                pin: pin.to_owned(),
            },
        ));
        Ok(Some(used))
    }

    fn take_fd_link(&mut self, link: Link) -> std::result::Result<FdLink, ProgramError> {
        let fd = |e: aya::programs::links::LinkError| {
            ProgramError::IOError(std::io::Error::other(e.to_string()))
        };
        match link {
            Link::Owned(id) => FdLink::try_from(self.program_mut().take_link(id)?).map_err(fd),
            Link::OwnedTc(id) => FdLink::try_from(self.tc_program_mut().take_link(id)?).map_err(fd),
            Link::Pinned { .. } => unreachable!("only a new link is pinned"),
        }
    }

    /// Ends this daemon's hold on the data path. `keep`: leave everything
    /// pinned and attached (forwarding continues; the next daemon adopts it).
    /// Otherwise detach from every interface and remove the pins.
    pub fn shutdown(&mut self, keep: bool) {
        for (a, link) in std::mem::take(&mut self.attached) {
            match link {
                Link::Owned(id) => {
                    if let Err(e) = self.program_mut().detach(id) {
                        tracing::warn!(iface = %a.interface, error = %e, "detach failed");
                    }
                }
                Link::OwnedTc(id) => {
                    if let Err(e) = self.tc_program_mut().detach(id) {
                        tracing::warn!(iface = %a.interface, error = %e, "detach failed");
                    }
                }
                // Dropping our fd leaves the pinned link (and the program) in place.
                Link::Pinned { fd, pin } if keep => drop((fd, pin)),
                Link::Pinned { fd, pin } => {
                    if let Err(e) = std::fs::remove_file(&pin) {
                        tracing::warn!(iface = %a.interface, error = %e, "unpinning the link failed");
                    }
                    // The last reference: the link detaches as the fd closes.
                    drop(fd);
                }
            }
        }
        if !keep {
            if let Some(dir) = self.pin_dir.take() {
                if let Err(e) = super::remove_pins(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing pins failed");
                }
            }
        }
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.attached.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Detaches pinned links of interfaces that are not in `keep` (an
    /// earlier daemon's config attached to more interfaces than this one's).
    pub fn drop_stale_links(&mut self, keep: &[String]) {
        let Some(dir) = &self.pin_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link-") {
                if !keep.iter().any(|k| k == iface) {
                    tracing::info!(
                        iface,
                        "detaching from an interface the config no longer lists"
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The mode an attached XDP program runs in, as rtnetlink reports it.
fn xdp_mode_of(iface: &str) -> Hook {
    match iface::xdp_generic(iface) {
        Some(true) => Hook::XdpGeneric,
        _ => Hook::Xdp,
    }
}
