//! The least a forwarder can do at each hook: swap the Ethernet addresses and
//! send the frame back out (XDP_TX; at TC, `bpf_redirect` to the interface it
//! came in on). `cargo xtask bench` measures the balancer against them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    helpers::generated::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn floor(ctx: XdpContext) -> u32 {
    if !swap_macs(ctx.data(), ctx.data_end()) {
        return xdp_action::XDP_PASS;
    }
    xdp_action::XDP_TX
}

#[classifier]
pub fn tc_floor(ctx: TcContext) -> i32 {
    if !swap_macs(ctx.data(), ctx.data_end()) {
        return TC_ACT_OK;
    }
    // SAFETY: the context is the program's own __sk_buff; plain helper call.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

#[inline(always)]
fn swap_macs(start: usize, end: usize) -> bool {
    if start + 12 > end {
        return false;
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
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
