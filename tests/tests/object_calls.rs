//! What the built data path calls, read from its object file: no `memset`,
//! `memcpy`, `memmove` or `memcmp` subprogram on any path of either program.
//! LLVM's BPF backend turns a zeroed struct, a 3-byte pad or a 6-byte copy
//! into such a call, and every call is a real one (about 20 ns each on a
//! machine with the SRSO "safe RET" mitigation): the per-packet budget of an
//! established flow is a few of them. The only calls allowed besides kernel
//! helpers are the named subprograms below, off the fast path.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// Subprograms the programs may call (BPF-to-BPF), each off the fast path.
const ALLOWED: &[&str] = &[
    // The FIB lookup, when a next hop is not cached (forward.rs).
    "forward6lookup",
    // Building a TCP reset (lb_common::reset).
    "5reset9tcp_reset",
    // The flow tables' changes of stage (conntrack.rs): SYNs, handshakes'
    // last ACKs, FINs and RSTs; established packets take none of them.
    "9conntrack4plan",
    "9conntrack6commit",
    "9conntrack9establish",
    "9conntrack4open",
    "9conntrack15close_transient",
    "9conntrack6retire",
    "9conntrack7replace",
    "9conntrack18reset_backend_side",
];

const FORBIDDEN: &[&str] = &["memset", "memcpy", "memmove", "memcmp"];

#[test]
fn the_data_path_calls_no_memory_builtins_and_only_known_subprograms() {
    let bytes: &[u8] = lb_userspace::dataplane::PROGRAM;
    let file = object::File::parse(bytes).expect("the embedded eBPF object parses");
    let mut seen = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or("?").to_owned();
        if !(name == "xdp" || name == "classifier" || name == ".text") {
            continue;
        }
        for (_, reloc) in section.relocations() {
            let RelocationTarget::Symbol(idx) = reloc.target() else {
                continue;
            };
            let Ok(sym) = file.symbol_by_index(idx) else {
                continue;
            };
            let target = sym.name().unwrap_or("?").to_owned();
            // Map relocations name the maps' symbols; calls name functions.
            if sym.kind() != object::SymbolKind::Text && sym.kind() != object::SymbolKind::Section {
                continue;
            }
            seen.push((name.clone(), target));
        }
    }
    for (section, target) in &seen {
        assert!(
            !FORBIDDEN.iter().any(|f| target == f),
            "section {section} calls {target}: a memory builtin on the packet path \
             (build the value with word stores; see forward.rs and conntrack.rs)"
        );
    }
    // Every call into .text lands on a known subprogram.
    let text_calls: Vec<String> = {
        let text = file.section_by_name(".text").expect("a .text section");
        let mut targets = Vec::new();
        for section in file.sections() {
            let Ok(sname) = section.name() else { continue };
            if !(sname == "xdp" || sname == "classifier" || sname == ".text") {
                continue;
            }
            let data = section.data().expect("section data");
            for (offset, reloc) in section.relocations() {
                let RelocationTarget::Symbol(idx) = reloc.target() else {
                    continue;
                };
                let Ok(sym) = file.symbol_by_index(idx) else {
                    continue;
                };
                if sym.section_index() != Some(text.index()) {
                    continue;
                }
                let at = offset as usize;
                // A BPF call: opcode 0x85 with src_reg 1 (a pseudo call);
                // its target is the section symbol plus (imm + 1) instructions.
                if data.get(at) != Some(&0x85) || data.get(at + 1).map(|b| b >> 4) != Some(1) {
                    continue;
                }
                let imm = i32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
                let to = if sym.kind() == object::SymbolKind::Section {
                    // Relative to the call: its own index + imm + 1.
                    let own = if sname == ".text" { at as i64 } else { -1 };
                    if own < 0 {
                        // A call from a program section into .text: the
                        // section-relative target is the addend of imm.
                        ((imm as i64 + 1) * 8) as u64
                    } else {
                        (own + (imm as i64 + 1) * 8) as u64
                    }
                } else {
                    sym.address()
                };
                let name = file
                    .symbols()
                    .find(|s| {
                        s.section_index() == Some(text.index())
                            && s.kind() == object::SymbolKind::Text
                            && s.address() <= to
                            && to < s.address() + s.size().max(1)
                    })
                    .and_then(|s| s.name().ok().map(str::to_owned))
                    .unwrap_or_else(|| format!(".text+{to:#x}"));
                targets.push(name);
            }
        }
        targets
    };
    assert!(
        !text_calls.is_empty(),
        "the programs call their subprograms: none found"
    );
    for t in &text_calls {
        assert!(
            ALLOWED.iter().any(|a| t.contains(a)),
            "a call to {t}, which is not a known subprogram of the slow paths"
        );
    }
    println!("subprogram calls: {text_calls:?}");
}
