//! The least an XDP forwarder can do: swap the Ethernet addresses and send the
//! frame back out (XDP_TX). `cargo xtask bench` measures the balancer against it.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn floor(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 12 > end {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut [u8; 12];
    // SAFETY: the 12 address bytes are inside the frame (checked above).
    unsafe {
        let a = *eth;
        let mut b = [0u8; 12];
        b[..6].copy_from_slice(&a[6..]);
        b[6..].copy_from_slice(&a[..6]);
        *eth = b;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
