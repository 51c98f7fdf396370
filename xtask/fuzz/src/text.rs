//! Text a client or user sends: QMP lines, migration URIs, `--drive` and `--object`
//! specs, sizes.

use qemu_file::MigrationUri;
use vmm::qmp;
use vmm::spec::{DriveSpec, parse_size};

/// Target `qmp`: a stream of QMP input, read whole and again in pieces of every size the
/// first byte picks; whatever it is, every reply is well-formed JSON, and how the input
/// was split does not change the messages read.
pub fn qmp(data: &[u8]) {
    let whole = qmp::parse(data);
    for c in &whole {
        if let Err(e) = &c.request {
            let reply = e.to_reply().to_string();
            let back: serde_json::Value = serde_json::from_str(&reply).expect("a JSON reply");
            assert!(back["error"]["desc"].is_string(), "{reply:.200}");
        }
    }
    let piece = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut s = qmp::json::JsonStreamer::new(qmp::MAX_COMMAND);
    let mut msgs = Vec::new();
    for chunk in data.chunks(piece) {
        s.feed(chunk, &mut msgs);
    }
    s.feed(b"\n", &mut msgs);
    let split: Vec<_> = msgs.into_iter().map(qmp::command).collect();
    assert_eq!(
        split, whole,
        "reading in pieces of {piece} changed the messages"
    );
}

/// Target `uri`: the input as a URI, a drive spec, an object spec and a size; a parsed
/// URI prints back to itself.
pub fn uri(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = MigrationUri::parse(s) {
        let again = MigrationUri::parse(&u.to_string())
            .unwrap_or_else(|e| panic!("{u} (from {s:?}) does not parse again: {e}"));
        assert_eq!(again, u, "{s:?}");
    }
    let _ = s.parse::<DriveSpec>();
    let _ = s.parse::<vmm::object::ObjectSpec>();
    let _ = parse_size(s);
}

/// Seeds of `qmp`.
pub fn qmp_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"execute": "qmp_capabilities"}"#,
        r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}, "id": 1}"#,
        r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 30, "max-bandwidth": 1000000}}"#,
        r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "return-path", "state": false}, {"capability": "events", "state": true}]}}"#,
        r#"{"execute": "query-migrate", "id": {"a": [1, 2.5, null, true, "x"]}}"#,
        r#"{"execute": "x-query-guest"}"#,
        "{'execute': 'stop'}{\"execute\":\n \"cont\"}\r\n[1, -2.5e3, true, null] \"\\u00e9\"",
        r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "postcopy-ram", "state": false}]}}"#,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info migrate"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Seeds of `uri`.
pub fn uri_seeds() -> Vec<Vec<u8>> {
    [
        "tcp:127.0.0.1:4444",
        "tcp:[::1]:4444",
        "tcp:localhost:0",
        "unix:/tmp/vmm.sock",
        "fd:3",
        "exec:cat > /tmp/x",
        "file:/tmp/snap",
        "file=/tmp/a.img,id=disk0,migrate=off,create=on",
        "tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server,verify-peer=on",
        "authz-list,id=a,policy=deny,rules.0.match=CN=*,,O=Example,rules.0.policy=allow,rules.0.format=glob",
        "authz-simple,id=b,identity=CN=src.example",
        "256M",
        "1GiB",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
