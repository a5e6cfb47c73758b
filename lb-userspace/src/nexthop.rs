//! Keeps the data path's cache of backends' next hops current from the kernel.
//!
//! For every target (backend id, address) the watcher asks the kernel what `ip route get ADDR`
//! asks (RTM_GETROUTE) and combines the answer with the output link (source MAC, MTU) and the
//! neighbour entry of the next hop (destination MAC) into a [`Hop`].
//!
//! Instead of polling, a second netlink socket subscribes to the kernel's change notifications
//! (links, neighbours, IPv4 addresses and routes): a change is seen within milliseconds and an
//! idle host costs nothing. When a change may make sent hops wrong, the watcher first sends
//! [`Event::Invalidate`]: every cached hop is stale from then on, and the data path falls back
//! to its own FIB lookup until the [`Event::Hops`] that follows the re-resolution arrives.
//! The notifications of a burst are gathered for [`COALESCE`] after the first one, so a burst
//! costs one Invalidate and one re-resolution.
//!
//! The kernel keeps a neighbour resolved only while its own stack uses it; packets sent by
//! XDP/TC do not count. So the next hops of targets and the gateways of the main table's routes
//! on the data path's interfaces become *managed* neighbour entries (NTF_EXT_MANAGED in
//! NDA_FLAGS_EXT, Linux 5.16+), which the kernel keeps resolving by itself, exactly as
//! `ip neigh replace ADDR dev DEV managed` makes them.
//!
//! If a socket fails, the watcher sends Invalidate, reopens both sockets after a backoff and
//! resolves everything again.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::{channel::mpsc::UnboundedReceiver, StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress as NA, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::route::{RouteMetric, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::{mpsc::UnboundedSender, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{debug, info, warn};

/// How long further notifications of a burst are gathered before re-resolving.
pub const COALESCE: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Receive buffer of the notification socket (capped by net.core.rmem_max).
const NOTIFY_RCVBUF: usize = 4 << 20;

/// Where a backend's packets leave, as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u32,
}

/// What the watcher tells the daemon.
#[derive(Debug)]
pub enum Event {
    /// Something cached hops depend on changed: every cached hop is stale from now.
    Invalidate,
    /// The resolved hop of each current target (backend id, hop); None where it cannot be
    /// resolved now (no route, the route is local/blackhole/unreachable, neighbour not resolved).
    Hops(Vec<(u32, Option<Hop>)>),
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum NexthopError {
    /// The rtnetlink request socket could not be opened.
    #[error("opening the rtnetlink request socket")]
    RequestSocket(#[source] std::io::Error),
    /// The notification socket could not be opened or bound to the multicast groups.
    #[error("subscribing to rtnetlink notifications")]
    Subscribe(#[source] std::io::Error),
}

/// Starts the watcher. `targets`: the current (backend id, backend address) list (the daemon
/// updates it as backends come and go). `interfaces`: the data path's interface names.
/// Events go to `events`. Must be called inside a tokio runtime; sockets are opened in the
/// caller's network namespace (the daemon has already entered it).
pub fn spawn(
    targets: watch::Receiver<Vec<(u32, Ipv4Addr)>>,
    interfaces: Vec<String>,
    manage: bool,
    events: UnboundedSender<Event>,
) -> Result<JoinHandle<()>, NexthopError> {
    let conns = Conns::open()?;
    let watcher = Watcher {
        handle: conns.handle.clone(),
        targets,
        interfaces,
        manage,
        events,
        watched: HashMap::new(),
        managed: HashSet::new(),
        new_gateways: HashSet::new(),
        rescan_routes: true,
    };
    Ok(tokio::spawn(watcher.run(conns)))
}

/// Resolves `targets` once, for tools without a daemon loop (the bench, the
/// tests): starts a watcher on a runtime of its own and returns the first
/// hops that are all resolved, or the last ones after `wait`.
pub fn resolve_blocking(
    targets: Vec<(u32, Ipv4Addr)>,
    interfaces: Vec<String>,
    wait: Duration,
) -> Result<Vec<(u32, Option<Hop>)>, NexthopError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NexthopError::RequestSocket)?;
    rt.block_on(async move {
        let (_targets_tx, targets_rx) = watch::channel(targets);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = spawn(targets_rx, interfaces, true, tx)?;
        let deadline = Instant::now() + wait;
        let mut last = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let Event::Hops(h) = e {
                let done = h.iter().all(|(_, hop)| hop.is_some());
                last = h;
                if done {
                    break;
                }
            }
        }
        task.abort();
        Ok(last)
    })
}

/// A neighbour table key: (ifindex, IPv4 address).
type NeighKey = (u32, Ipv4Addr);

/// What a notification means for the sent hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Decision {
    Ignore,
    /// Hops may have become resolvable: re-resolve, no Invalidate.
    Refresh,
    /// Sent hops may be wrong: Invalidate at once, then re-resolve.
    InvalidateAndRefresh,
}

/// Whether a neighbour in `state` has a usable link-layer address.
fn nud_valid(state: NeighbourState) -> bool {
    // NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
    const VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
    u16::from(state) & VALID != 0
}

/// The destination MAC a neighbour entry offers now, if any.
fn usable_mac(deleted: bool, state: NeighbourState, lladdr: Option<[u8; 6]>) -> Option<[u8; 6]> {
    lladdr.filter(|_| !deleted && nud_valid(state))
}

/// `sent`: None if the neighbour is no target's, else the dmac last sent through it (None if
/// it was unresolved). `now`: the usable MAC the notification reports.
fn neighbour_matters(sent: Option<Option<[u8; 6]>>, now: Option<[u8; 6]>) -> Decision {
    match (sent, now) {
        (None, _) | (Some(None), None) => Decision::Ignore,
        (Some(Some(old)), Some(new)) if old == new => Decision::Ignore,
        (Some(Some(_)), _) => Decision::InvalidateAndRefresh,
        (Some(None), Some(_)) => Decision::Refresh,
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Neigh {
    state: NeighbourState,
    lladdr: Option<[u8; 6]>,
    managed: bool,
}

fn parse_neigh(m: &NeighbourMessage) -> Option<(NeighKey, Neigh)> {
    if m.header.family != AddressFamily::Inet {
        return None; // e.g. bridge FDB entries, which may carry an IPv4 NDA_DST
    }
    let (mut dst, mut lladdr, mut managed) = (None, None, false);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NA::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::LinkLayerAddress(l) => lladdr = l.as_slice().try_into().ok(),
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            _ => {}
        }
    }
    let neigh = Neigh {
        state: m.header.state,
        lladdr,
        managed,
    };
    Some(((m.header.ifindex, dst?), neigh))
}

struct Link {
    name: String,
    /// None for links without an Ethernet address (loopback, tunnels, NOARP devices).
    mac: Option<[u8; 6]>,
    mtu: u32,
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        mac: None,
        mtu: 0,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            _ => {}
        }
    }
    if m.header
        .flags
        .intersects(LinkFlags::Loopback | LinkFlags::Noarp)
    {
        link.mac = None;
    }
    link
}

/// The useful part of an `ip route get` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RouteInfo {
    oif: u32,
    /// The gateway, or the destination itself when it is on-link.
    hop: Ipv4Addr,
    /// RTAX_MTU of the route (or of a PMTU exception), if any.
    mtu: Option<u32>,
}

fn parse_route_get(dst: Ipv4Addr, m: &RouteMessage) -> Option<RouteInfo> {
    if m.header.kind != RouteType::Unicast {
        return None; // local, broadcast, blackhole, unreachable, prohibit, ...
    }
    let (mut oif, mut hop, mut mtu) = (None, dst, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => hop = *g,
            RouteAttribute::Via(_) => return None, // IPv6 next hop: no IPv4 neighbour
            RouteAttribute::Metrics(ms) => {
                mtu = ms.iter().find_map(|m| match m {
                    RouteMetric::Mtu(v) if *v > 0 => Some(*v),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Some(RouteInfo {
        oif: oif?,
        hop,
        mtu,
    })
}

fn build_hop(route: &RouteInfo, link: Option<&Link>, neigh: Option<&Neigh>) -> Option<Hop> {
    let link = link?;
    let neigh = neigh?;
    Some(Hop {
        ifindex: route.oif,
        smac: link.mac?,
        dmac: usable_mac(false, neigh.state, neigh.lladdr)?,
        mtu: route.mtu.map_or(link.mtu, |m| m.min(link.mtu)),
    })
}

/// IPv4 gateways (ifindex, address) of a main-table unicast route, ECMP paths included.
fn route_gateways(m: &RouteMessage) -> Vec<NeighKey> {
    let attrs = &m.attributes;
    let table = attrs.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    if m.header.address_family != AddressFamily::Inet
        || m.header.kind != RouteType::Unicast
        || table.unwrap_or(u32::from(m.header.table)) != u32::from(RouteHeader::RT_TABLE_MAIN)
    {
        return Vec::new();
    }
    let gateway = |attrs: &[RouteAttribute]| {
        attrs.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        })
    };
    let oif = attrs.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let paths = attrs.iter().flat_map(|a| match a {
        RouteAttribute::MultiPath(paths) => paths.as_slice(),
        _ => &[],
    });
    let multipath = paths.filter_map(|p| Some((p.interface_index, gateway(&p.attributes)?)));
    oif.zip(gateway(attrs))
        .into_iter()
        .chain(multipath)
        .collect()
}

fn ipv4_route_message() -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m
}

type Notifications = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The two netlink connections of one session; their tasks end with it.
struct Conns {
    handle: Handle,
    notifications: Notifications,
    tasks: [JoinHandle<()>; 2],
}

impl Conns {
    fn open() -> Result<Conns, NexthopError> {
        const GROUPS: [MulticastGroup; 4] = [
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv4Route,
        ];
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NexthopError::RequestSocket)?;
        let (mut mconn, _, notifications) =
            rtnetlink::new_multicast_connection(&GROUPS).map_err(NexthopError::Subscribe)?;
        if let Err(e) = mconn.socket_mut().socket_mut().set_rx_buf_sz(NOTIFY_RCVBUF) {
            warn!("nexthop: cannot enlarge the notification socket buffer: {e}");
        }
        let tasks = [tokio::spawn(conn), tokio::spawn(mconn)];
        Ok(Conns {
            handle,
            notifications,
            tasks,
        })
    }
}

impl Drop for Conns {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// Why a session ended.
enum Exit {
    /// The events receiver is gone: the watcher ends.
    EventsClosed,
    /// A socket failed: reopen.
    Lost(String),
}

impl From<rtnetlink::Error> for Exit {
    fn from(e: rtnetlink::Error) -> Exit {
        Exit::Lost(e.to_string())
    }
}

struct Watcher {
    handle: Handle,
    targets: watch::Receiver<Vec<(u32, Ipv4Addr)>>,
    interfaces: Vec<String>,
    /// Whether neighbours are made managed (`[daemon] manage_neighbours`).
    manage: bool,
    events: UnboundedSender<Event>,
    /// Neighbours of the current targets -> the dmac last sent through them.
    watched: HashMap<NeighKey, Option<[u8; 6]>>,
    /// Neighbours already made managed (or found managed or permanent).
    managed: HashSet<NeighKey>,
    /// Gateways of routes notified since the last resolution.
    new_gateways: HashSet<NeighKey>,
    /// Dump the routes for gateways at the next resolution (start, lost notifications).
    rescan_routes: bool,
}

impl Watcher {
    async fn run(mut self, mut conns: Conns) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match self.session(&mut conns.notifications).await {
                Exit::EventsClosed => return,
                Exit::Lost(why) => warn!("nexthop: rtnetlink failed ({why}), reopening"),
            }
            if started.elapsed() > BACKOFF_MAX * 3 {
                backoff = BACKOFF_MIN;
            }
            if self.emit(Event::Invalidate).is_err() {
                return;
            }
            conns = loop {
                tokio::select! {
                    _ = self.events.closed() => return,
                    _ = sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match Conns::open() {
                    Ok(c) => break c,
                    Err(e) => warn!("nexthop: {e}"),
                }
            };
            self.handle = conns.handle.clone();
        }
    }

    fn emit(&self, event: Event) -> Result<(), Exit> {
        self.events.send(event).map_err(|_| Exit::EventsClosed)
    }

    /// Resolves once, then follows notifications until something fails.
    async fn session(&mut self, notifications: &mut Notifications) -> Exit {
        self.watched.clear();
        self.managed.clear();
        self.rescan_routes = true;
        if let Err(exit) = self.refresh().await {
            return exit;
        }
        let (mut deadline, mut invalidated, mut targets_open) = (None, false, true);
        loop {
            tokio::select! {
                _ = self.events.closed() => return Exit::EventsClosed,
                note = notifications.next() => {
                    let Some((msg, _)) = note else {
                        return Exit::Lost("notification socket closed".into());
                    };
                    let decision = self.classify(msg);
                    if decision == Decision::InvalidateAndRefresh && !invalidated {
                        if let Err(exit) = self.emit(Event::Invalidate) {
                            return exit;
                        }
                        invalidated = true;
                    }
                    if decision != Decision::Ignore {
                        deadline.get_or_insert_with(|| Instant::now() + COALESCE);
                    }
                }
                changed = self.targets.changed(), if targets_open => {
                    if changed.is_err() {
                        info!("nexthop: targets sender dropped, keeping the last list");
                        targets_open = false;
                    } else {
                        deadline.get_or_insert_with(Instant::now);
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    (deadline, invalidated) = (None, false);
                    if let Err(exit) = self.refresh().await {
                        return exit;
                    }
                }
            }
        }
    }

    fn classify(&mut self, msg: NetlinkMessage<RouteNetlinkMessage>) -> Decision {
        use RouteNetlinkMessage as M;
        let inner = match msg.payload {
            NetlinkPayload::InnerMessage(inner) => inner,
            NetlinkPayload::Overrun(_) => {
                warn!("nexthop: notifications lost (socket overrun), resynchronising");
                self.managed.clear();
                self.rescan_routes = true;
                return Decision::InvalidateAndRefresh;
            }
            _ => return Decision::Ignore,
        };
        match inner {
            M::NewRoute(r) if r.header.address_family == AddressFamily::Inet => {
                self.new_gateways.extend(route_gateways(&r));
                Decision::InvalidateAndRefresh
            }
            M::DelRoute(r) if r.header.address_family == AddressFamily::Inet => {
                Decision::InvalidateAndRefresh
            }
            M::NewAddress(_) | M::DelAddress(_) | M::NewLink(_) => Decision::InvalidateAndRefresh,
            M::DelLink(l) => {
                self.managed.retain(|k| k.0 != l.header.index);
                Decision::InvalidateAndRefresh
            }
            M::NewNeighbour(n) => self.on_neighbour(&n, false),
            M::DelNeighbour(n) => self.on_neighbour(&n, true),
            _ => Decision::Ignore,
        }
    }

    fn on_neighbour(&mut self, m: &NeighbourMessage, deleted: bool) -> Decision {
        let Some((key, n)) = parse_neigh(m) else {
            return Decision::Ignore;
        };
        let now = usable_mac(deleted, n.state, n.lladdr);
        let decision = neighbour_matters(self.watched.get(&key).copied(), now);
        // A managed entry that disappeared is made again by the next resolution.
        if deleted && self.managed.remove(&key) {
            self.new_gateways.insert(key);
            return decision.max(Decision::Refresh);
        }
        decision
    }

    /// Resolves every target, sends Hops, then makes the needed neighbours managed.
    async fn refresh(&mut self) -> Result<(), Exit> {
        let targets = self.targets.borrow_and_update().clone();
        let links = self.handle.link().get().execute();
        let links: HashMap<u32, Link> = links
            .map_ok(|m| (m.header.index, parse_link(&m)))
            .try_collect()
            .await?;
        let neighs = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet);
        let neighs: Vec<NeighbourMessage> = neighs.execute().try_collect().await?;
        let neighs: HashMap<NeighKey, Neigh> = neighs.iter().filter_map(parse_neigh).collect();

        let mut hops = Vec::with_capacity(targets.len());
        let mut watched = HashMap::new();
        for (id, addr) in targets {
            let route = self.route_get(addr).await?;
            let hop = route.and_then(|r| {
                let hop = build_hop(&r, links.get(&r.oif), neighs.get(&(r.oif, r.hop)));
                watched.insert((r.oif, r.hop), hop.map(|h| h.dmac));
                hop
            });
            hops.push((id, hop));
        }
        debug!("nexthop: resolved {hops:?}");
        self.emit(Event::Hops(hops))?;

        let ours = |k: &NeighKey| {
            links
                .get(&k.0)
                .is_some_and(|l| self.interfaces.contains(&l.name))
        };
        let mut gateways: Vec<NeighKey> =
            std::mem::take(&mut self.new_gateways).into_iter().collect();
        if std::mem::take(&mut self.rescan_routes) {
            let mut routes = self.handle.route().get(ipv4_route_message()).execute();
            while let Some(route) = routes.try_next().await? {
                gateways.extend(route_gateways(&route));
            }
        }
        gateways.retain(ours);
        self.watched = watched;
        let wanted = self
            .watched
            .keys()
            .copied()
            .chain(gateways)
            .collect::<HashSet<_>>();
        for key in wanted {
            if self.manage
                && links.get(&key.0).is_some_and(|l| l.mac.is_some())
                && self.managed.insert(key)
            {
                self.ensure_managed(key, neighs.get(&key)).await?;
            }
        }
        Ok(())
    }

    /// `ip route get ADDR`; None if the kernel has no usable unicast route.
    async fn route_get(&self, addr: Ipv4Addr) -> Result<Option<RouteInfo>, Exit> {
        let mut req = ipv4_route_message();
        req.header.destination_prefix_length = 32;
        req.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(addr)));
        match self.handle.route().get(req).execute().next().await {
            Some(Ok(m)) => Ok(parse_route_get(addr, &m)),
            // ENETUNREACH/EHOSTUNREACH (unreachable), EINVAL (blackhole), EACCES (prohibit)
            Some(Err(rtnetlink::Error::NetlinkError(_))) | None => Ok(None),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Makes (ifindex, address) a managed neighbour unless it is managed or permanent already.
    /// Only a dead socket is an error; refusals are logged.
    async fn ensure_managed(
        &self,
        (ifindex, ip): NeighKey,
        now: Option<&Neigh>,
    ) -> Result<(), Exit> {
        if now.is_some_and(|n| n.managed || n.state == NeighbourState::Permanent) {
            return Ok(());
        }
        // What `ip neigh replace IP dev DEV managed` sends: NLM_F_CREATE|NLM_F_REPLACE,
        // state NUD_NONE, NDA_FLAGS_EXT = NTF_EXT_MANAGED.
        let neighbours = self.handle.neighbours();
        let mut req = neighbours
            .add(ifindex, IpAddr::V4(ip))
            .state(NeighbourState::None)
            .replace();
        let managed = NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed);
        req.message_mut().attributes.push(managed);
        match req.execute().await {
            Ok(()) => debug!("nexthop: neighbour {ip} on ifindex {ifindex} is now managed"),
            Err(rtnetlink::Error::RequestFailed) => {
                return Err(rtnetlink::Error::RequestFailed.into())
            }
            Err(e) => {
                warn!("nexthop: cannot make neighbour {ip} on ifindex {ifindex} managed: {e}")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NeighbourState as S;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    #[test]
    fn nud_validity() {
        for s in [
            S::Reachable,
            S::Stale,
            S::Delay,
            S::Probe,
            S::Permanent,
            S::Noarp,
        ] {
            assert!(nud_valid(s), "{s:?}");
        }
        for s in [S::Failed, S::Incomplete, S::None, S::Other(0x100)] {
            assert!(!nud_valid(s), "{s:?}");
        }
    }

    #[test]
    fn neighbour_decisions() {
        use Decision::*;
        assert_eq!(neighbour_matters(None, Some(B)), Ignore); // no target's neighbour
        for s in [S::Reachable, S::Stale, S::Delay, S::Probe] {
            assert_eq!(
                neighbour_matters(Some(Some(A)), usable_mac(false, s, Some(A))),
                Ignore
            );
        }
        assert_eq!(
            neighbour_matters(Some(Some(A)), Some(B)),
            InvalidateAndRefresh
        );
        for (deleted, s) in [
            (false, S::Failed),
            (false, S::Incomplete),
            (true, S::Reachable),
        ] {
            let now = usable_mac(deleted, s, Some(A));
            assert_eq!(neighbour_matters(Some(Some(A)), now), InvalidateAndRefresh);
        }
        assert_eq!(neighbour_matters(Some(None), Some(A)), Refresh);
        assert_eq!(
            neighbour_matters(Some(None), usable_mac(false, S::Incomplete, None)),
            Ignore
        );
        assert_eq!(
            neighbour_matters(Some(None), usable_mac(false, S::Noarp, None)),
            Ignore
        );
    }

    fn route(kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = ipv4_route_message();
        (m.header.kind, m.header.table, m.attributes) = (kind, RouteHeader::RT_TABLE_MAIN, attrs);
        m
    }

    fn gw(ip: Ipv4Addr) -> RouteAttribute {
        RouteAttribute::Gateway(RouteAddress::Inet(ip))
    }

    #[test]
    fn route_get_answers() {
        let direct = route(RouteType::Unicast, vec![RouteAttribute::Oif(3)]);
        assert_eq!(
            parse_route_get(IP, &direct),
            Some(RouteInfo {
                oif: 3,
                hop: IP,
                mtu: None
            })
        );
        let mtu = RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]);
        let via = route(
            RouteType::Unicast,
            vec![RouteAttribute::Oif(4), gw(GW), mtu],
        );
        let expected = RouteInfo {
            oif: 4,
            hop: GW,
            mtu: Some(1400),
        };
        assert_eq!(parse_route_get(IP, &via), Some(expected));
        for kind in [
            RouteType::Local,
            RouteType::BlackHole,
            RouteType::Unreachable,
        ] {
            assert_eq!(
                parse_route_get(IP, &route(kind, vec![RouteAttribute::Oif(1)])),
                None
            );
        }
        assert_eq!(
            parse_route_get(IP, &route(RouteType::Unicast, vec![])),
            None
        );
    }

    #[test]
    fn hop_building() {
        let r = RouteInfo {
            oif: 3,
            hop: GW,
            mtu: Some(1400),
        };
        let link = Link {
            name: "eth0".into(),
            mac: Some(A),
            mtu: 1500,
        };
        let neigh = Neigh {
            state: S::Stale,
            lladdr: Some(B),
            managed: false,
        };
        let hop = Hop {
            ifindex: 3,
            smac: A,
            dmac: B,
            mtu: 1400,
        };
        assert_eq!(build_hop(&r, Some(&link), Some(&neigh)), Some(hop));
        let jumbo = RouteInfo {
            mtu: Some(9000),
            ..r.clone()
        };
        assert_eq!(
            build_hop(&jumbo, Some(&link), Some(&neigh)).map(|h| h.mtu),
            Some(1500)
        );
        let failed = Neigh {
            state: S::Failed,
            lladdr: Some(B),
            managed: true,
        };
        assert_eq!(build_hop(&r, Some(&link), Some(&failed)), None);
        let lo = Link { mac: None, ..link };
        assert_eq!(build_hop(&r, Some(&lo), Some(&neigh)), None);
        assert_eq!(build_hop(&r, None, Some(&neigh)), None);
    }

    #[test]
    fn gateways_of_main_table_routes() {
        let single = route(RouteType::Unicast, vec![RouteAttribute::Oif(2), gw(GW)]);
        assert_eq!(route_gateways(&single), vec![(2, GW)]);
        let mut path = netlink_packet_route::route::RouteNextHop::default();
        (path.interface_index, path.attributes) = (5, vec![gw(IP)]);
        let ecmp = route(
            RouteType::Unicast,
            vec![RouteAttribute::MultiPath(vec![path])],
        );
        assert_eq!(route_gateways(&ecmp), vec![(5, IP)]);
        let attrs = vec![RouteAttribute::Oif(2), gw(GW), RouteAttribute::Table(100)];
        assert!(route_gateways(&route(RouteType::Unicast, attrs)).is_empty());
        let on_link = route(RouteType::Unicast, vec![RouteAttribute::Oif(2)]);
        assert!(route_gateways(&on_link).is_empty());
    }

    #[test]
    fn neighbour_parsing() {
        let mut m = NeighbourMessage::default();
        (m.header.family, m.header.ifindex, m.header.state) =
            (AddressFamily::Inet, 7, S::Reachable);
        m.attributes = vec![
            NeighbourAttribute::Destination(NA::Inet(GW)),
            NeighbourAttribute::LinkLayerAddress(A.to_vec()),
            NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
        ];
        let expected = Neigh {
            state: S::Reachable,
            lladdr: Some(A),
            managed: true,
        };
        assert_eq!(parse_neigh(&m), Some(((7, GW), expected)));
        m.attributes.clear();
        assert_eq!(parse_neigh(&m), None);
    }
}
