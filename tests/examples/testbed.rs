//! Brings up the two-backend testbed with nginx and `lb` and keeps it up until
//! Enter is pressed: for poking at it by hand (`ip netns exec tb-cli curl
//! http://10.0.0.100/`). Run as root: `cargo run -p lb-tests --example testbed`.
use lb_tests::{daemon::LbDaemon, nginx::Nginx, topology::*};

fn main() {
    lb_tests::require_root();
    let t = Topology::new("tb", 2);
    let _webs: Vec<Nginx> = t.start_webs();
    let lb = LbDaemon::start(&t.lb, |sock| {
        lb_config(sock, &service_block("web", 80, "tcp", 2, 80))
    });
    println!(
        "up; lb log at {}; socket {}; press Enter to tear down",
        lb.log.display(),
        lb.socket.display()
    );
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}
