//! Tests of spec parsing.

use super::*;

#[test]
fn parses_all_keys_and_suffixes() {
    let s = Spec::parse("workload=memstress wss=64M ops=200k seed=9 rate=50k pattern=hotcold hot=5 hotw=95").unwrap();
    assert_eq!(s.kind, Kind::Memstress);
    assert_eq!(s.wss, 64 << 20);
    assert_eq!(s.ops, 200_000);
    assert_eq!(s.seed, 9);
    assert_eq!(s.rate, 50_000);
    assert_eq!(s.pattern, Pattern::HotCold);
    assert_eq!((s.hot, s.hotw), (5, 95));
    let f = Spec::parse("ops=10 workload=ftp rate=100M chunk=16K").unwrap();
    assert_eq!((f.kind, f.rate, f.chunk, f.ops), (Kind::Ftp, 100 << 20, 16 << 10, 10));
    assert_eq!(Spec::parse("workload=ftp rate=max").unwrap().rate, 0);
    assert_eq!(Spec::parse("workload=build").unwrap(), Spec::defaults(Kind::Build));
}

#[test]
fn sizes_and_counts_up_to_tera() {
    assert_eq!(parse_size("1T"), Some(1 << 40));
    assert_eq!(parse_size("2TiB"), Some(2 << 40));
    assert_eq!(parse_size("3G"), Some(3 << 30));
    assert_eq!(parse_size("16777216T"), None, "2^64 overflows");
    assert_eq!(parse_count("1T"), Some(1_000_000_000_000));
    assert_eq!(parse_count("2t"), Some(2_000_000_000_000));
    assert_eq!(parse_size("1P"), None);
}

#[test]
fn rejects_bad_input_with_named_culprit() {
    assert_eq!(Spec::parse("wss=1M"), Err(ParseError::MissingWorkload));
    assert_eq!(Spec::parse("workload=nope"), Err(ParseError::UnknownWorkload("nope")));
    assert!(matches!(
        Spec::parse("workload=build pattern=seq"),
        Err(ParseError::UnknownKey { key: "pattern", .. })
    ));
    assert!(matches!(
        Spec::parse("workload=memstress wss=12Q"),
        Err(ParseError::BadValue {
            key: "wss",
            value: "12Q",
            ..
        })
    ));
    assert_eq!(
        Spec::parse("workload=memstress ops=1 ops=2"),
        Err(ParseError::Duplicate("ops"))
    );
    assert_eq!(
        Spec::parse("workload=memstress junk"),
        Err(ParseError::NotKeyValue("junk"))
    );
    assert!(matches!(
        Spec::parse("workload=memstress wss=5000"),
        Err(ParseError::Inconsistent(_))
    ));
    assert!(matches!(
        Spec::parse("workload=ftp wss=64K chunk=64K"),
        Err(ParseError::Inconsistent(_))
    ));
    assert!(Spec::parse("workload=memstress ops=99999999999999999999").is_err());
    assert!(Spec::parse("workload=memstress hot=101").is_err());
}

#[test]
fn disk_keys_and_device_words_anywhere() {
    let line = "virtio_mmio.device=512@0xfeb00000:5 workload=ftp disk=on irq=on dsize=16M \
                virtio_mmio.device=512@0xfeb00e00:12 chunk=64K virtio_mmio.device=4K@0xd0000000:5:1";
    let s = Spec::parse(line).unwrap();
    assert!(s.disk && s.irq && s.uses_disk());
    assert_eq!((s.dsize, s.chunk), (16 << 20, 64 << 10));
    assert_eq!(Spec::parse("workload=ftp disk=on irq=on dsize=16M chunk=64K"), Ok(s));
    let d = Spec::parse("workload=dblog").unwrap();
    assert_eq!(d, Spec::defaults(Kind::Dblog));
    assert!(d.uses_disk() && !d.irq);
    assert_eq!((d.flush, d.dsize, d.wss), (16, 64 << 20, 4 << 20));
    let d = Spec::parse("workload=dblog flush=0 rate=2k disk=on wss=1M dsize=1M ops=10 seed=4").unwrap();
    assert_eq!((d.flush, d.rate, d.dsize), (0, 2000, 1 << 20));
    assert!(!Spec::parse("workload=build").unwrap().uses_disk());
    assert!(Spec::parse("workload=build disk=on").unwrap().uses_disk());
    // consnap's --workload sugar: the words are just more keys.
    assert!(Spec::parse("workload=memstress virtio_mmio.device=4K@0xd0000000:5").is_ok());
}

#[test]
fn rejects_bad_disk_settings_and_dotted_words() {
    assert!(matches!(
        Spec::parse("workload=ftp virtio_mmio.device=4K@0xd0000000"),
        Err(ParseError::BadValue {
            key: "virtio_mmio.device",
            value: "4K@0xd0000000",
            ..
        })
    ));
    assert!(matches!(
        Spec::parse("workload=ftp foo.bar=1"),
        Err(ParseError::UnknownKey { key: "foo.bar", .. })
    ));
    assert!(matches!(
        Spec::parse("workload=ftp virtio_mmio.devices=4K@0x1000:5"),
        Err(ParseError::UnknownKey { .. })
    ));
    assert!(matches!(
        Spec::parse("workload=memstress disk=on"),
        Err(ParseError::UnknownKey { key: "disk", .. })
    ));
    assert!(matches!(
        Spec::parse("workload=ftp disk=yes"),
        Err(ParseError::BadValue { key: "disk", .. })
    ));
    assert_eq!(
        Spec::parse("workload=ftp disk=on disk=off"),
        Err(ParseError::Duplicate("disk"))
    );
    for inconsistent in [
        "workload=ftp irq=on",
        "workload=dblog disk=off",
        "workload=dblog wss=32K",
        "workload=dblog dsize=128K",
        "workload=ftp disk=on dsize=5000",
        "workload=ftp disk=on chunk=1000",
        "workload=ftp disk=on chunk=64K dsize=512K",
        "workload=build disk=on dsize=1M",
    ] {
        assert!(
            matches!(Spec::parse(inconsistent), Err(ParseError::Inconsistent(_))),
            "{inconsistent}"
        );
    }
    // dsize only matters with the disk.
    assert!(Spec::parse("workload=ftp dsize=5000").is_ok());
}

#[test]
fn kv_takes_an_address_a_port_and_the_disk() {
    let s = Spec::parse("workload=kv ip=10.0.2.15").unwrap();
    assert_eq!((s.kind, s.ip, s.port), (Kind::Kv, [10, 0, 2, 15], DEFAULT_PORT));
    assert!(!s.uses_disk());
    assert_eq!(Spec { ip: [0; 4], ..s }, Spec::defaults(Kind::Kv));
    let s = Spec::parse("port=65535 workload=kv disk=on irq=on dsize=1M ip=192.168.100.254 wss=1M").unwrap();
    assert_eq!(
        (s.ip, s.port, s.dsize, s.wss),
        ([192, 168, 100, 254], 65535, 1 << 20, 1 << 20)
    );
    assert!(s.uses_disk() && s.irq);
    assert_eq!(Spec::parse("workload=kv ip=1.0.0.0 port=1").unwrap().port, 1);
    // Other workloads keep the defaults and take neither key.
    let m = Spec::parse("workload=memstress").unwrap();
    assert_eq!((m.ip, m.port), ([0; 4], DEFAULT_PORT));
}

#[test]
fn kv_rejects_bad_addresses_and_ports_by_name() {
    assert_eq!(
        Spec::parse("workload=kv port=7000"),
        Err(ParseError::MissingKey {
            workload: Kind::Kv,
            key: "ip"
        })
    );
    let mut kv = Spec::defaults(Kind::Kv);
    for ip in [
        "10.0.2",
        "10.0.2.15.1",
        "10.0.2.256",
        "010.0.2.15",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "a.b.c.d",
        "10..2.15",
        "+1.2.3.4",
        "1.2.3.4.",
        "",
        "1.2.3.-4",
    ] {
        assert!(
            matches!(kv.set("ip", ip), Err(ParseError::BadValue { key: "ip", value, .. }) if value == ip),
            "{ip}"
        );
    }
    for port in ["0", "65536", "+7000", "7k", "", "-1", "99999999999999999999"] {
        assert!(
            matches!(kv.set("port", port), Err(ParseError::BadValue { key: "port", value, .. }) if value == port),
            "{port}"
        );
    }
    assert!(matches!(
        Spec::parse("workload=kv ip=10.0.2.256"),
        Err(ParseError::BadValue { key: "ip", .. })
    ));
    assert!(matches!(
        Spec::parse("workload=kv ip=10.0.2.2 port=0"),
        Err(ParseError::BadValue { key: "port", .. })
    ));
    for (line, key) in [
        ("workload=memstress ip=10.0.0.1", "ip"),
        ("workload=dblog port=7000", "port"),
        ("workload=ftp disk=on ip=10.0.0.1", "ip"),
        ("workload=kv ip=10.0.0.1 ops=5", "ops"),
        ("workload=kv ip=10.0.0.1 seed=5", "seed"),
        ("workload=kv ip=10.0.0.1 rate=5", "rate"),
    ] {
        assert!(
            matches!(Spec::parse(line), Err(ParseError::UnknownKey { key: k, .. }) if k == key),
            "{line}"
        );
    }
    assert_eq!(
        Spec::parse("workload=kv ip=10.0.0.1 ip=10.0.0.2"),
        Err(ParseError::Duplicate("ip"))
    );
    assert!(matches!(
        Spec::parse("workload=kv ip=10.0.0.1 irq=on"),
        Err(ParseError::Inconsistent(_))
    ));
}

#[cfg(feature = "std")]
#[test]
fn messages_name_every_workload_and_the_missing_key() {
    let missing = std::format!("{}", ParseError::MissingWorkload);
    let unknown = std::format!("{}", ParseError::UnknownWorkload("x"));
    for k in Kind::ALL {
        assert!(missing.contains(k.name()) && unknown.contains(k.name()), "{k:?}");
        assert_eq!(Kind::from_name(k.name()), Some(k));
    }
    let e = Spec::parse("workload=kv").unwrap_err();
    assert_eq!(
        std::format!("{e}"),
        "workload kv needs ip=A.B.C.D, the guest's IPv4 address"
    );
}
