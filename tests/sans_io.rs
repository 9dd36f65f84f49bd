//! The replication core is sans-IO: it never reads a clock, sleeps, spawns
//! or touches a socket. Time and randomness come in as arguments, which is
//! what lets the simulator replay any run from its seed.

const CORE: &[(&str, &str)] = &[
    ("layout.rs", include_str!("../src/replication/layout.rs")),
    (
        "layout_state.rs",
        include_str!("../src/replication/layout_state.rs"),
    ),
    (
        "membership.rs",
        include_str!("../src/replication/membership.rs"),
    ),
    ("message.rs", include_str!("../src/replication/message.rs")),
    ("replica.rs", include_str!("../src/replication/replica.rs")),
];

#[test]
fn the_replication_core_names_no_clock_runtime_or_socket() {
    let forbidden = [
        "tokio",
        "Instant::now",
        "SystemTime",
        "std::thread",
        "UdpSocket",
        "TcpStream",
        "quinn",
        "thread_rng",
        "rand::rng()",
    ];
    for (file, text) in CORE {
        // Tests may time themselves; the code they test may not.
        let code = text.split("#[cfg(test)]").next().unwrap_or(text);
        for word in forbidden {
            assert!(!code.contains(word), "src/replication/{file} uses {word}");
        }
    }
}
