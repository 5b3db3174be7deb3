//! The inspector guard: `cgroup/connect4` and `cgroup/connect6` programs that keep a Node.js
//! inspector window memscope opened for itself alone (issue 17, item 3).
//!
//! Attached (by `profiler-user/src/v8/guard.rs`) to the root of the cgroup v2 hierarchy, so
//! every `connect(2)` on the host (TCP fast open and io_uring connects too: they go through
//! the same hook) passes here while a window is open. A connect to a guarded
//! `(network namespace cookie, port)` on a local address (127.0.0.0/8, 0.0.0.0, ::1, ::,
//! ::ffff:127.x.y.z, ::ffff:0.0.0.0) is refused (the caller gets `EPERM`) unless the socket is
//! one memscope registered by its cookie in `ALLOWED` for that very key. Everything else is let
//! through untouched: the programs never rewrite an address.
//!
//! A separate object from the allocator probes (`main.rs`): loading it costs nothing on their
//! path, and the agent loads it only when a V8 operation needs it.
//!
//! Helpers: `bpf_get_netns_cookie` (5.7+ for sock_addr programs), `bpf_get_socket_cookie`
//! (4.12+ for sock_addr programs); maps are plain hash maps. Needs cgroup v2 and BPF links (5.7+).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};

/// Guarded `[network namespace cookie, port]` -> 1.
#[map]
static GUARDED: HashMap<[u64; 2], u32> = HashMap::with_max_entries(64, 0);

/// Socket cookie of one of memscope's own sockets -> the `[netns cookie, port]` it may connect to.
#[map]
static ALLOWED: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(1024, 0);

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn guard_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // Network byte order in memory: on a little-endian machine the first octet is the low byte.
    let ip = unsafe { core::ptr::read_volatile(&(*sa).user_ip4) };
    let local = ip & 0xff == 127 || ip == 0;
    if !local {
        return ALLOW;
    }
    decide(sa, unsafe { core::ptr::read_volatile(&(*sa).user_port) })
}

#[cgroup_sock_addr(connect6)]
pub fn guard_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let w0 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[0]) };
    let w1 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[1]) };
    let w2 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[2]) };
    let w3 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[3]) };
    let local = if w0 == 0 && w1 == 0 && w2 == 0 {
        // :: and ::1
        w3 == 0 || w3 == 0x0100_0000
    } else if w0 == 0 && w1 == 0 && w2 == 0xffff_0000 {
        // ::ffff:127.x.y.z and ::ffff:0.0.0.0 (IPv4 through an IPv6 socket)
        w3 & 0xff == 127 || w3 == 0
    } else {
        false
    };
    if !local {
        return ALLOW;
    }
    decide(sa, unsafe { core::ptr::read_volatile(&(*sa).user_port) })
}

#[inline(always)]
fn decide(sa: *mut bpf_sock_addr, user_port: u32) -> i32 {
    let port = u16::from_be(user_port as u16) as u64;
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let key = [netns, port];
    if unsafe { GUARDED.get(&key) }.is_none() {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    match unsafe { ALLOWED.get(&cookie) } {
        Some(k) if k[0] == key[0] && k[1] == key[1] => ALLOW,
        _ => REFUSE,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
