//! Generators of valid inputs, one per target: what a client, a server, a
//! walsender or a config author would send. The runner damages them.

use super::runner::Rng;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

fn i16(out: &mut Vec<u8>, v: i16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A short word: a name from a list, or random letters, or noise.
fn word(rng: &mut Rng) -> Vec<u8> {
    const WORDS: [&str; 14] = [
        "user",
        "database",
        "app",
        "postgres",
        "replication",
        "options",
        "application_name",
        "client_encoding",
        "UTF8",
        "true",
        "database",
        "on",
        "é\u{1F600}",
        "",
    ];
    match rng.below(4) {
        0 | 1 => WORDS[rng.below(WORDS.len())].as_bytes().to_vec(),
        2 => (0..rng.below(12))
            .map(|_| b'a' + rng.below(26) as u8)
            .collect(),
        _ => {
            let n = rng.below(16);
            rng.bytes(n)
                .into_iter()
                .map(|b| if b == 0 { 1 } else { b })
                .collect()
        }
    }
}

/// A random message body of random size.
fn body(rng: &mut Rng) -> Vec<u8> {
    let n = rng.len().min(4096);
    rng.bytes(n)
}

/// Client → proxy: startup packets, password messages, then relayed traffic.
pub fn frontend(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(3) {
        let code: i32 = *rng.pick(&[80_877_103, 80_877_104]);
        i32(&mut out, 8);
        i32(&mut out, code);
    }
    let mut packet = Vec::new();
    if rng.chance(1, 10) {
        i32(&mut packet, 80_877_102);
        i32(&mut packet, rng.next() as i32);
        i32(&mut packet, rng.next() as i32);
    } else {
        i32(&mut packet, 196_608);
        for _ in 0..rng.below(5) {
            cstr(&mut packet, &word(rng));
            cstr(&mut packet, &word(rng));
        }
        packet.push(0);
    }
    i32(&mut out, packet.len() as i32 + 4);
    out.extend_from_slice(&packet);
    match rng.below(3) {
        0 => {
            // md5: "md5" + 32 hex digits.
            let mut p = b"md5".to_vec();
            p.extend((0..32).map(|_| b"0123456789abcdef"[rng.below(16)]));
            p.push(0);
            out.extend(msg(b'p', &p));
        }
        1 => {
            // SCRAM: SASLInitialResponse, then SASLResponse.
            let nonce: Vec<u8> = (0..rng.below(30))
                .map(|_| b'A' + rng.below(26) as u8)
                .collect();
            let mut first = b"n,,n=,r=".to_vec();
            first.extend_from_slice(&nonce);
            let mut p = Vec::new();
            cstr(&mut p, b"SCRAM-SHA-256");
            i32(&mut p, first.len() as i32);
            p.extend_from_slice(&first);
            out.extend(msg(b'p', &p));
            let mut fin = b"c=biws,r=".to_vec();
            fin.extend_from_slice(&nonce);
            fin.extend_from_slice(b",p=");
            let proof_len = *rng.pick(&[44usize, 43, 0, 8]);
            fin.extend((0..proof_len).map(|_| {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="[rng.below(65)]
            }));
            out.extend(msg(b'p', &fin));
        }
        _ => {}
    }
    for _ in 0..rng.below(6) {
        let tag = *rng.pick(b"QPBEDSCHFXdcfp");
        let b = match tag {
            b'Q' => {
                let mut q = word(rng);
                q.push(0);
                q
            }
            b'S' | b'H' | b'X' | b'c' => vec![],
            _ => body(rng),
        };
        out.extend(msg(tag, &b));
    }
    out
}

fn error_fields(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..rng.below(8) {
        b.push(*rng.pick(b"SVCMDHPqWFLRsntcd"));
        cstr(&mut b, &word(rng));
    }
    b.push(0);
    b
}

fn data_row(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    let n = rng.below(6);
    i16(&mut b, n as i16);
    for _ in 0..n {
        if rng.chance(1, 5) {
            i32(&mut b, -1);
        } else {
            let w = word(rng);
            i32(&mut b, w.len() as i32);
            b.extend_from_slice(&w);
        }
    }
    b
}

/// Server → proxy / pgshift's own connections.
pub fn backend(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let m = match rng.below(12) {
            0 => {
                let mut b = Vec::new();
                let code = *rng.pick(&[0, 3, 5, 10, 11, 12]);
                i32(&mut b, code);
                match code {
                    5 => b.extend(rng.bytes(4)),
                    10 => {
                        cstr(&mut b, b"SCRAM-SHA-256");
                        b.push(0);
                    }
                    11 | 12 => b.extend(word(rng)),
                    _ => {}
                }
                msg(b'R', &b)
            }
            1 => {
                let mut b = Vec::new();
                cstr(&mut b, &word(rng));
                cstr(&mut b, &word(rng));
                msg(b'S', &b)
            }
            2 => {
                let mut b = Vec::new();
                i32(&mut b, rng.next() as i32);
                i32(&mut b, rng.next() as i32);
                msg(b'K', &b)
            }
            3 => msg(b'Z', &[*rng.pick(b"ITEX")]),
            4 => msg(*rng.pick(b"EN"), &error_fields(rng)),
            5 => msg(b'D', &data_row(rng)),
            6 => {
                let mut b = b"SELECT ".to_vec();
                b.extend(word(rng));
                b.push(0);
                msg(b'C', &b)
            }
            7 => msg(b'd', &copy_data(rng)),
            8 => msg(*rng.pick(b"T1234ntsIVG"), &body(rng)),
            _ => msg(b'D', &body(rng)),
        };
        out.extend(m);
    }
    out
}

/// One pgoutput message (protocol 1 or 2, `in_stream`: with the xid).
pub fn pgoutput_message(rng: &mut Rng, in_stream: bool) -> Vec<u8> {
    let mut b = Vec::new();
    let xid = |b: &mut Vec<u8>, rng: &mut Rng| {
        if in_stream {
            i32(b, rng.next() as i32);
        }
    };
    let tuple = |b: &mut Vec<u8>, rng: &mut Rng| {
        let n = rng.below(5);
        i16(b, n as i16);
        for _ in 0..n {
            match rng.below(4) {
                0 => b.push(b'n'),
                1 => b.push(b'u'),
                _ => {
                    b.push(*rng.pick(b"tb"));
                    let w = word(rng);
                    i32(b, w.len() as i32);
                    b.extend_from_slice(&w);
                }
            }
        }
    };
    let tag = *rng.pick(b"BCORYIUDTMSEcA");
    b.push(tag);
    match tag {
        b'B' => {
            u64(&mut b, rng.next());
            u64(&mut b, rng.next());
            i32(&mut b, rng.next() as i32);
        }
        b'C' => {
            b.push(0);
            u64(&mut b, rng.next());
            u64(&mut b, rng.next());
            u64(&mut b, rng.next());
        }
        b'O' => {
            u64(&mut b, rng.next());
            cstr(&mut b, &word(rng));
        }
        b'R' => {
            xid(&mut b, rng);
            i32(&mut b, rng.next() as i32);
            cstr(&mut b, &word(rng));
            cstr(&mut b, &word(rng));
            b.push(*rng.pick(b"dnfi"));
            let n = rng.below(5);
            i16(&mut b, n as i16);
            for _ in 0..n {
                b.push(rng.below(2) as u8);
                cstr(&mut b, &word(rng));
                i32(&mut b, rng.next() as i32);
                i32(&mut b, -1);
            }
        }
        b'Y' => {
            xid(&mut b, rng);
            i32(&mut b, rng.next() as i32);
            cstr(&mut b, &word(rng));
            cstr(&mut b, &word(rng));
        }
        b'I' => {
            xid(&mut b, rng);
            i32(&mut b, rng.next() as i32);
            b.push(b'N');
            tuple(&mut b, rng);
        }
        b'U' => {
            xid(&mut b, rng);
            i32(&mut b, rng.next() as i32);
            if rng.chance(1, 2) {
                b.push(*rng.pick(b"KO"));
                tuple(&mut b, rng);
            }
            b.push(b'N');
            tuple(&mut b, rng);
        }
        b'D' => {
            xid(&mut b, rng);
            i32(&mut b, rng.next() as i32);
            b.push(*rng.pick(b"KO"));
            tuple(&mut b, rng);
        }
        b'T' => {
            xid(&mut b, rng);
            let n = rng.below(4);
            i32(&mut b, n as i32);
            b.push(rng.below(4) as u8);
            for _ in 0..n {
                i32(&mut b, rng.next() as i32);
            }
        }
        b'M' => {
            xid(&mut b, rng);
            b.push(rng.below(2) as u8);
            u64(&mut b, rng.next());
            cstr(&mut b, b"pgshift");
            let w = word(rng);
            i32(&mut b, w.len() as i32);
            b.extend_from_slice(&w);
        }
        b'S' => {
            i32(&mut b, rng.next() as i32);
            b.push(rng.below(2) as u8);
        }
        b'E' => {}
        b'c' => {
            i32(&mut b, rng.next() as i32);
            b.push(0);
            u64(&mut b, rng.next());
            u64(&mut b, rng.next());
            u64(&mut b, rng.next());
        }
        _ => {
            i32(&mut b, rng.next() as i32);
            i32(&mut b, rng.next() as i32);
        }
    }
    b
}

/// A stream of pgoutput messages, each with a u16 length prefix (the
/// format `pgshift::fuzzing::pgoutput` reads).
pub fn pgoutput(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut in_stream = false;
    for _ in 0..1 + rng.below(6) {
        let m = pgoutput_message(rng, in_stream);
        match m[0] {
            b'S' => in_stream = true,
            b'E' => in_stream = false,
            _ => {}
        }
        out.extend_from_slice(&(m.len() as u16).to_be_bytes());
        out.extend(m);
    }
    out
}

/// A CopyData body on a replication connection: XLogData carrying a
/// pgoutput message, or a primary keepalive.
pub fn copy_data(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    if rng.chance(1, 3) {
        b.push(b'k');
        u64(&mut b, rng.next());
        u64(&mut b, rng.next());
        b.push(rng.below(2) as u8);
    } else {
        b.push(b'w');
        u64(&mut b, rng.next());
        u64(&mut b, rng.next());
        u64(&mut b, rng.next());
        let in_stream = rng.chance(1, 4);
        b.extend(pgoutput_message(rng, in_stream));
    }
    b
}

/// A simple-query string built from the tokens the SQL scanner cares about.
pub fn sqltext(rng: &mut Rng) -> Vec<u8> {
    const TOKENS: [&str; 34] = [
        "PREPARE",
        "prepare",
        "a",
        "A",
        "s1",
        "\"Mixed\"\"q\"",
        "\"",
        "AS",
        "SELECT",
        "$1",
        "'",
        "''",
        "E'",
        "e'\\'",
        "\\",
        "$$",
        "$f$",
        "$a",
        "--",
        "\n",
        "/*",
        "*/",
        ";",
        "SET",
        "RESET",
        "TRANSACTION",
        "local",
        "search_path",
        "=",
        "(int)",
        "DEALLOCATE",
        "é",
        "\u{1F600}",
        "\t",
    ];
    words(rng, &TOKENS, 40).into_bytes()
}

/// Up to `most` of `tokens`, mostly space-separated.
fn words(rng: &mut Rng, tokens: &[&str], most: usize) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(most) {
        s.push_str(tokens[rng.below(tokens.len())]);
        if rng.chance(2, 3) {
            s.push(' ');
        }
    }
    s
}

/// A query string of DDL and other statements, built from the tokens the
/// splitter and the command tags care about.
pub fn ddl(rng: &mut Rng) -> Vec<u8> {
    const TOKENS: [&str; 52] = [
        "CREATE",
        "create",
        "OR",
        "REPLACE",
        "FUNCTION",
        "PROCEDURE",
        "SCHEMA",
        "TABLE",
        "AS",
        "ALTER",
        "DROP",
        "INDEX",
        "CONCURRENTLY",
        "UNIQUE",
        "TYPE",
        "ADD",
        "VALUE",
        "DETACH",
        "PARTITION",
        "SELECT",
        "INTO",
        "WITH",
        "GRANT",
        "REVOKE",
        "ON",
        "TO",
        "COMMENT",
        "BEGIN",
        "ATOMIC",
        "CASE",
        "END",
        "DO",
        "t",
        "(",
        ")",
        "'",
        "E'",
        "\\'",
        "\"",
        "$$",
        "$f$",
        "$1",
        "--",
        "\n",
        "/*",
        "*/",
        ";",
        ";",
        ".",
        "é",
        "\u{1F600}",
        "\t",
    ];
    let s = words(rng, &TOKENS, 60);
    if rng.chance(1, 3) {
        // As a captured DDL event (a capture table row's JSON).
        const TAGS: [&str; 5] = [
            "ALTER TABLE",
            "CREATE TABLE",
            "CREATE INDEX",
            "DROP TABLE",
            "GRANT",
        ];
        const KINDS: [&str; 5] = ["table", "index", "table column", "function", "trigger"];
        let object = format!(
            r#"{{"tag":"{}","type":"{}","schema":"public","identity":"public.t","table":{{"schema":"public","name":"t"}},"def":null,"names":["public","t","c"]}}"#,
            TAGS[rng.below(TAGS.len())],
            KINDS[rng.below(KINDS.len())]
        );
        return format!(
            r#"{{"v":1,"kind":"{}","id":"1.{}","tag":"{}","nth":{},"query":{},"search_path":null,"role":null,"objects":[{}]}}"#,
            if rng.chance(1, 4) { "drop" } else { "end" },
            rng.below(5),
            TAGS[rng.below(TAGS.len())],
            rng.below(4),
            serde_json::to_string(&s).unwrap_or_default(),
            if rng.chance(1, 2) { object } else { String::new() }
        )
        .into_bytes();
    }
    s.into_bytes()
}

/// A config file: every section, values often written with `${VAR}`
/// references, durations, sizes and windows in their several spellings.
pub fn config(rng: &mut Rng) -> Vec<u8> {
    const HOSTS: [&str; 6] = [
        "127.0.0.1",
        "${HOST}",
        "localhost",
        "[::1]",
        "h@st",
        "${MISSING}",
    ];
    const PASSWORDS: [&str; 6] = ["${PW}", "secret", "p%40ss", "${EMPTY}", "$${PW}", "${"];
    const DURATIONS: [&str; 9] = [
        "5s",
        "500ms",
        "2m",
        "1h",
        "1.5d",
        "0",
        "-1s",
        "99999999999999999999d",
        "1e3s",
    ];
    const SIZES: [&str; 7] = ["16MB", "1GB", "512kB", "100", "0", "99999999999TB", "1 gib"];
    const WINDOWS: [&str; 5] = [
        "Sat 02:00-04:00 UTC",
        "daily 23:00-01:00",
        "Mon-Fri 01:00-02:00 Europe/Paris",
        "25:00-26:00",
        "",
    ];
    let pick = |rng: &mut Rng, list: &[&str]| list[rng.below(list.len())].to_string();
    let host = pick(rng, &HOSTS);
    let pw = pick(rng, &PASSWORDS);
    let url = if rng.chance(1, 4) {
        format!(
            "host={host} port=${{PORT}} user=${{USER}} password={pw} dbname=postgres sslmode=prefer"
        )
    } else {
        let ssl = pick(
            rng,
            &[
                "",
                "?sslmode=require",
                "?sslmode=verify-full&sslrootcert=/x",
            ],
        );
        format!("postgres://${{USER}}:{pw}@{host}:5432/postgres{ssl}")
    };
    let mut t = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nauth = \"{}\"\nmax_message_size = \"{}\"\nstartup_timeout = \"{}\"\n\n\
         [[proxy.users]]\nname = \"${{USER}}\"\npassword = \"{pw}\"\n\n\
         [source]\nurl = \"{url}\"\n\n[target]\nurl = \"postgres://app:{pw}@{host}:5433/postgres\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{}\"\n",
        rng.below(70000),
        pick(rng, &["scram-sha-256", "md5", "trust", "password"]),
        pick(rng, &SIZES),
        pick(rng, &DURATIONS),
        rng.below(70000),
    );
    if rng.chance(1, 2) {
        t.push_str(&format!(
            "\n[migration]\nname = \"{}\"\ndatabases = [\"app\", \"{}\"]\n",
            pick(rng, &["m1", "bad name", "", "a-b"]),
            pick(rng, &["billing", "postgres", "app"]),
        ));
    }
    if rng.chance(1, 2) {
        t.push_str(&format!(
            "\n[cutover]\ntrigger = \"{}\"\nwindow = [\"{}\"]\ndrain_timeout = \"{}\"\nstart_when_lag_below = \"{}\"\nverify = \"{}\"\n",
            pick(rng, &["manual", "auto", "window"]),
            pick(rng, &WINDOWS),
            pick(rng, &DURATIONS),
            pick(rng, &SIZES),
            pick(rng, &["off", "counts", "checksums"]),
        ));
    }
    t.into_bytes()
}
