//! The `portico` binary as an operator meets it: `check` on good and broken
//! files, exit codes, and `demo` serving traffic until SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PORTICO: &str = env!("CARGO_BIN_EXE_portico");

fn repo_file(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_the_shipped_configs() {
    for file in ["config/portico.toml", "config/demo.toml"] {
        let out = Command::new(PORTICO)
            .args(["check", "--config", &repo_file(file)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "configuration ok"
        );
        // Nor do they trip their own warnings (audit49 D7: the reference
        // set a queue_timeout without a cap). The open-file limit is the
        // machine's, not the file's.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|line| line.contains("warning") && !line.contains("open-file limit"))
            .collect();
        assert!(warnings.is_empty(), "{file}: {warnings:?}");
    }
}

/// `portico check` warns of a `max_connections` the open-file limit
/// cannot hold, as `nginx -t` warns of its `worker_connections`, and
/// still passes the file (review33e F7).
#[test]
fn check_warns_of_a_cap_past_the_open_file_limit() {
    let (dir, file) = written(
        "capcheck",
        "capped.toml",
        "[server]\nmax_connections = 500\n[[upstream]]\nname = \"a\"\n\
         backends = [\"127.0.0.1:8001\"]\n[[route]]\nupstream = \"a\"\n",
    );
    let run = format!(
        "ulimit -n 200 && exec {PORTICO} check --config {}",
        file.display()
    );
    let out = Command::new("sh").args(["-c", &run]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // At its line, as `nginx -t` says its warnings (review42i M2).
    assert!(
        stderr.contains("capped.toml:2:1: server.max_connections leaves no room"),
        "{stderr}"
    );
    assert!(stderr.contains("open-file limit 200"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration ok"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A `queue_timeout` where no backend has a `max_conns` waits for
/// nothing: said at its line, and the file still passes.
#[test]
fn check_warns_of_a_queue_timeout_without_a_cap() {
    let (dir, file) = written(
        "queuecheck",
        "queue.toml",
        "[[upstream]]\nname = \"a\"\nbackends = [\"127.0.0.1:8001\"]\nqueue_timeout = \"10s\"\n\
         [[upstream]]\nname = \"b\"\nbackends = [{ addr = \"127.0.0.1:8002\", max_conns = 4 }]\n\
         queue_timeout = \"10s\"\n[[route]]\nupstream = \"a\"\n[[route]]\npath_prefix = \"/b/\"\nupstream = \"b\"\n",
    );
    let out = checked(&file);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "portico check: warning: {}:4:1: upstream[0].queue_timeout: has no effect: no backend of upstream `a` has a max_conns (max_conns_per_backend, or max_conns in its table)",
            file.display()
        )
    );
    // With `--log-format json`, a record, as the errors are (ops54 L4).
    let out = Command::new(PORTICO)
        .args(["check", "--log-format", "json", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let record: serde_json::Value = serde_json::from_str(stderr.trim()).expect("one JSON record");
    assert_eq!(record["level"], "WARN", "{stderr}");
    assert_eq!(record["key"], "upstream[0].queue_timeout", "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_reports_every_error_with_its_position_and_exits_1() {
    let (dir, file) = written(
        "cli",
        "broken.toml",
        r#"[server]
listen = ["127.0.0.1:8080"]
colour = "blue"

[[upstream]]
name = "orders"
backends = ["127.0.0.1:8001"]
connect_timeout = "2 parsecs"

[[route]]
path_prefix = "/"
upstream = "inventory"
"#,
    );
    let out = checked(&file);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    for want in [
        format!("{name}:3:1"),   // unknown key `colour`
        format!("{name}:8:19"),  // bad duration
        format!("{name}:12:12"), // unknown upstream
    ] {
        assert!(stderr.contains(&want), "missing {want} in:\n{stderr}");
    }
    for key in ["colour", "connect_timeout", "upstream"] {
        assert!(stderr.contains(key), "missing key {key} in:\n{stderr}");
    }
    // Starting on it, or checking it, with JSON logs: every error is a
    // JSON record, so a collector that parses each line sees why
    // (review29b F9; `check` ignored the flag, review32d).
    for check in [false, true] {
        let mut command = Command::new(PORTICO);
        if check {
            command.arg("check");
        }
        let out = command
            .args(["--log-format", "json", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let records: Vec<serde_json::Value> = stderr
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        assert_eq!(records.len(), 3, "{stderr}");
        assert!(records.iter().all(|r| r["level"] == "ERROR"), "{stderr}");
        assert!(stderr.contains(&format!("{name}:8:19")), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(PORTICO)
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(PORTICO).arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // More threads than any machine wants: refused up front, not a panic
    // when the OS refuses one (review29b F6).
    let out = Command::new(PORTICO)
        .args(["--threads", "5000", "demo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The demo makes its own configuration: a file given would be ignored,
    // wherever the flag stands.
    for (args, says) in [
        (
            ["demo", "--config", "config/portico.toml"],
            "unexpected argument",
        ),
        (["--config", "config/portico.toml", "demo"], "is not read"),
    ] {
        let out = Command::new(PORTICO).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(says), "{args:?}: {said}");
    }
    // A name for an address: what is wanted, said (review35c).
    let out = Command::new(PORTICO)
        .args(["demo", "--listen", "localhost:8080"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("names such as localhost are not resolved"),
        "{said}"
    );
    let out = Command::new(PORTICO)
        .args(["demo", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(!help.contains("--config"), "{help}");
}

/// A demo whose port is taken exits 1 naming the flag that moves it: its
/// user wrote flags, not a file.
#[test]
fn a_demo_port_in_use_names_the_flag_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    for (flag, other) in [("--listen", "--admin"), ("--admin", "--listen")] {
        let out = Command::new(PORTICO)
            .args(["demo", flag, &busy, other, "127.0.0.1:0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let said = String::from_utf8_lossy(&out.stderr);
        let hint = format!("choose another with {flag}");
        // Once: the log line is on stderr already.
        assert_eq!(said.matches(&hint).count(), 1, "{flag}: {said}");
    }
    // A log filter that hides errors still leaves the reason on stderr.
    let out = Command::new(PORTICO)
        .args(["demo", "--listen", &busy, "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("choose another with --listen"), "{said}");
    // Its own two on one port (a wildcard covers the other) say so, rather
    // than blame another process (review28d F6).
    let port = taken.local_addr().unwrap().port();
    drop(taken);
    let (wild, one) = (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}"));
    // A usage error (review34d: exit 1).
    let out = Command::new(PORTICO)
        .args(["demo", "--listen", &wild, "--admin", &one])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("take the same port"), "{said}");
}

/// DESIGN's standard flags are the order backend's too.
#[test]
fn the_order_backend_takes_the_standard_flags() {
    // Killed however the test ends, not left running after a failed
    // assertion (review35e L7).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_order-backend"))
            .args(["--listen", "127.0.0.1:0", "--name", "j"])
            .args(["--threads", "1", "--log-format", "json"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let line = line.expect("the backend logged a line");
    assert!(
        line.starts_with('{') && line.contains("\"listening\""),
        "{line}"
    );
    // Its orders' ids carry its name: another instance's store has its
    // own, and a Location from one is no order of another (review35c 1).
    let addr = addr_in(&line);
    let order = r#"{"items":[{"sku":"A-1","qty":1}],"amount_cents":5,"email":"a@example.com"}"#;
    let ask = format!(
        "POST /users/1/orders HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{order}",
        order.len()
    );
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::io::Write::write_all(&mut stream, ask.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    drop(child);
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("location: /orders/order-j-002\r\n"),
        "{answer}"
    );
    // A name X-Backend could not carry as it is: a usage error, not a
    // backend answering under another name.
    for name in ["", "bad\r\nX-Injected: 1", " lead", "a b"] {
        let out = Command::new(env!("CARGO_BIN_EXE_order-backend"))
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name:?}");
    }
}

#[test]
fn demo_serves_through_the_proxy_and_stops_on_sigterm() {
    demo_serves_and_drains_on("-TERM");
}

/// A closed terminal's SIGHUP drains the demo as SIGTERM does; it used to
/// kill it (exit 129) with its queued orders.
#[test]
fn demo_drains_on_sighup_too() {
    demo_serves_and_drains_on("-HUP");
}

/// Starts `portico demo` on loopback ports of its choosing: the process,
/// the proxy's address, and its log, whole once it exits.
fn start_demo() -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    start_demo_logging(true)
}

/// [`start_demo`]; without `read_log`, the log's pipe is closed at once,
/// as when the process reading it dies.
fn start_demo_logging(
    read_log: bool,
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    // Nothing typed: the demo reads its stdin, which is not the
    // developer's terminal.
    let (mut child, rx) = spawn_demo(Stdio::null(), Stdio::piped());
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        if read_log {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
        }
        log
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut proxy = None;
    while proxy.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.split(" behind http://").nth(1) {
                proxy = Some(rest.trim().to_owned());
            }
        }
    }
    (child, proxy.expect("demo printed its address"), log)
}

/// `portico demo` on loopback ports of its choosing, with `stdin` and
/// `stderr` as given: the process, and its stdout's lines as they come.
fn spawn_demo(
    stdin: Stdio,
    stderr: Stdio,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(PORTICO)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Sends `signal` to `child` and waits (bounded) for it to exit 0.
fn stop_with(child: &mut std::process::Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "demo did not stop after {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A reload stuck opening its file (a FIFO nobody writes to any more)
/// does not hold the exit: SIGTERM drains and the process ends (review42k
/// M1: it stayed, deaf to SIGTERM and SIGINT, until SIGKILL).
#[cfg(unix)]
#[test]
fn a_reload_stuck_on_its_file_does_not_hold_the_exit() {
    let dir = std::env::temp_dir().join(format!("portico-stuck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("portico.toml");
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
    // The file, once, for the start to read.
    let writing = fifo.clone();
    std::thread::spawn(move || {
        let config = "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                      [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
        let _ = std::fs::write(writing, config);
    });
    let mut command = Command::new(PORTICO);
    command
        .args(["--threads", "1", "--log-format", "json", "-c"])
        .arg(&fifo);
    let (mut proxy, log) = logging(command);
    let mut seen = Vec::new();
    line_with(&log, "listening (http", &mut seen);
    // The reload opens the FIFO, where no one will write again.
    hang_up(&proxy.0);
    // Time for the reload to reach the FIFO (it says nothing until it has
    // read); one that has not yet is no harm to the test.
    std::thread::sleep(Duration::from_millis(300));
    stop_with(&mut proxy.0, "-TERM");
    let _ = std::fs::remove_dir_all(dir);
}

/// A configuration through a shell pipe (`--config <(generate)`), as the
/// README offers: its relative paths are the working directory's, not
/// `/dev/fd/`'s, and a reload, which cannot read the pipe again, is
/// refused for that reason (review43b M1: it read nothing and blamed the
/// file for having no [[upstream]]).
#[cfg(unix)]
#[test]
fn a_configuration_through_a_pipe_or_standard_input_reloads_only_if_it_can() {
    let dir = std::env::temp_dir().join(format!("portico-piped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin.token"), "0123456789abcdef0123").unwrap();
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
                  [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
    std::fs::write(dir.join("portico.toml"), config).unwrap();
    let piped = |args: &str| {
        let mut command = Command::new("bash");
        command
            .current_dir(&dir)
            .arg("-c")
            .arg(format!("exec {PORTICO} {args} <(cat portico.toml)"));
        command
    };
    let checked = piped("check --config").output().unwrap();
    let said = String::from_utf8_lossy(&checked.stderr).into_owned()
        + &String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{said}");
    assert!(said.contains("configuration ok"), "{said}");

    let (mut proxy, log) = logging(piped("--threads 1 --log-format json -c"));
    let mut seen = Vec::new();
    line_with(&log, "listening (http", &mut seen);
    hang_up(&proxy.0);
    let refused = line_with(&log, "reload rejected", &mut seen);
    assert!(refused.contains("read once at start"), "{refused}");
    stop_with(&mut proxy.0, "-TERM");

    // A file through standard input is read again, until a new file is
    // renamed over it: the descriptor then reads the old one, whose text
    // a reload applied and called reloaded (review43g M1).
    let mut command = Command::new("bash");
    command.current_dir(&dir).arg("-c").arg(format!(
        "exec {PORTICO} --threads 1 --log-format json -c /dev/stdin < portico.toml"
    ));
    let (mut proxy, log) = logging(command);
    line_with(&log, "listening (http", &mut seen);
    hang_up(&proxy.0);
    line_with(&log, "configuration reloaded", &mut seen);
    std::fs::write(dir.join("new.toml"), config).unwrap();
    std::fs::rename(dir.join("new.toml"), dir.join("portico.toml")).unwrap();
    hang_up(&proxy.0);
    let refused = line_with(&log, "reload rejected", &mut seen);
    assert!(refused.contains("replaced or removed"), "{refused}");
    stop_with(&mut proxy.0, "-TERM");
    let _ = std::fs::remove_dir_all(dir);
}

/// A response still going when `shutdown_grace` (5 s in the demo) runs
/// out is cut as the process exits; its access line says so, rather than
/// that its client left.
#[test]
fn a_response_cut_when_the_grace_runs_out_is_logged_as_shutdown() {
    let (mut child, proxy, log) = start_demo();
    let stream = stalled_download(&mut child, &proxy, log);
    stop_with(&mut child, "-TERM");
    assert_cut_as_shutdown(&stream.1.join().unwrap());
    drop(stream.0);
}

/// A response a removed listener still serves when `shutdown_grace` runs
/// out after the reload is cut, and its access line says so
/// (`end="shutdown"`), as one cut at shutdown does, not that its client
/// left (review53 M2: only the process's cut marked what it cut).
#[test]
fn a_response_a_removed_listener_cuts_is_logged_as_shutdown() {
    use std::io::{Read, Write};
    let origin_addr = endless_origin();
    let extra = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = |listen: &str| {
        format!(
            "[server]\nlisten = [{listen}]\nshutdown_grace = \"1s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"o\"\nbackends = [\"{origin_addr}\"]\n\
             [[route]]\nupstream = \"o\"\n"
        )
    };
    let both = config(&format!("\"127.0.0.1:0\", \"{extra}\""));
    let mut run = portico_on("removed-cut", &both, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match std::net::TcpStream::connect(extra) {
            Ok(stream) => break stream,
            Err(error) => assert!(Instant::now() < deadline, "{extra}: {error}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 4096];
    assert!(stream.read(&mut head).unwrap() > 0);
    std::fs::write(run.dir.join("portico.toml"), config("\"127.0.0.1:0\"")).unwrap();
    hang_up(&run.proxy.0);
    line_with(&run.log, "configuration reloaded", &mut run.seen);
    let line = line_with(&run.log, "\"/stream\"", &mut run.seen);
    assert!(line.contains("\"end\":\"shutdown\""), "{line}");
    drop(run.proxy);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// An origin whose answer never ends: chunked, a byte every 50 ms.
fn endless_origin() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = origin.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in origin.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                while stream.write_all(b"1\r\nx\r\n").is_ok() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    addr
}

/// At shutdown, a response still going when `shutdown_grace` runs out is
/// logged `end="shutdown"` by `portico -c` too, which exits right after
/// the cut (review54 M1: the listeners' tasks that marked it were dropped
/// with the runtime first, and it said `client_gone`), and an HTTP/1.0
/// client, whose body the close frames, gets a reset, not a FIN that
/// makes the cut body read as whole (review54 L1).
#[test]
fn a_response_cut_at_exit_is_logged_as_shutdown_and_reset() {
    use std::io::{Read, Write};
    let origin = endless_origin();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n\
         [[upstream]]\nname = \"o\"\nbackends = [\"{origin}\"]\n\
         [[route]]\nupstream = \"o\"\n"
    );
    let mut run = portico_on("exit-cut", &config, None);
    let mut stream = connect(&run);
    write!(stream, "GET /stream HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    assert!(stream.read(&mut buf).unwrap() > 0);
    stop_with(&mut run.proxy.0, "-TERM");
    let line = line_with(&run.log, "\"/stream\"", &mut run.seen);
    assert!(line.contains("\"end\":\"shutdown\""), "{line}");
    let ended = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "closed",
            Ok(_) => {}
            Err(_) => break "reset",
        }
    };
    assert_eq!(ended, "reset");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A second stop signal cuts the drain short as it always did, exiting 1
/// within a second or two rather than after `shutdown_grace`, but the
/// requests it cuts are logged first (`end="shutdown"`): they used to
/// leave no line at all.
#[test]
fn a_second_stop_signal_logs_the_requests_it_cuts() {
    let (mut child, proxy, log) = start_demo();
    let (stream, log) = stalled_download(&mut child, &proxy, log);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Draining once the listener is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&proxy).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the demo never stopped listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = exit_of(&mut child, "a second signal");
    assert_eq!(status.code(), Some(1), "the demo ended with {status}");
    let log = log.join().unwrap();
    assert!(
        log.contains("second signal: closing the connections"),
        "{log}"
    );
    assert_cut_as_shutdown(&log);
    drop(stream);
}

/// Asks the demo for a large download and reads only the start of it:
/// the connection, still open, and the demo's log.
fn stalled_download(
    child: &mut std::process::Child,
    proxy: &str,
    log: std::thread::JoinHandle<String>,
) -> (std::net::TcpStream, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /bytes/60000000 HTTP/1.1\r\nHost: {proxy}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 4096];
    let began = stream.read(&mut head);
    if !began.as_ref().is_ok_and(|&n| n > 0) {
        // Seen once under a loaded machine (a read error): say what the
        // demo said, to learn why.
        let _ = child.kill();
        let log = log.join().unwrap();
        panic!("the answer did not begin ({began:?}); the demo's log:\n{log}");
    }
    // The client reads no more, and stays.
    (stream, log)
}

/// The stalled download's access line is in `log`, saying the shutdown
/// cut it.
fn assert_cut_as_shutdown(log: &str) {
    let line = log
        .lines()
        .find(|line| line.contains("path=\"/bytes/60000000\""))
        .unwrap_or_else(|| panic!("no access line in:\n{log}"));
    assert!(line.contains("end=\"shutdown\""), "{line}");
}

/// A log that cannot be written (its reader died: a restarted collector,
/// a `| logger` gone) loses lines, not requests: each line written to the
/// broken pipe used to panic whatever logged it, a request's task or the
/// main thread, which then exited 101 on SIGTERM without a drain
/// (review29b F1).
#[test]
fn a_broken_log_pipe_loses_log_lines_not_requests() {
    let (mut child, proxy, _log) = start_demo_logging(false);
    for path in [
        "/users/1/orders",
        "/health",
        "/health",
        "/users/2/orders",
        "/nope",
    ] {
        let answer = http_get(&proxy, path);
        assert!(answer.starts_with("HTTP/1.1 "), "{path}: {answer:?}");
    }
    stop_with(&mut child, "-TERM");
}

fn demo_serves_and_drains_on(signal: &str) {
    let (mut child, proxy, log) = start_demo();

    let body = http_get(&proxy, "/users/1/orders");
    assert!(body.contains("200 OK"), "{body}");
    assert!(body.contains("ORDER-001"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("x-backend: backend-"),
        "{body}"
    );

    stop_with(&mut child, signal);
    // Logs going to a file or a pipe carry no terminal colour codes.
    let log = log.join().unwrap();
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");
}

/// `stop N` typed into a running demo takes backend N out (its port
/// refuses, the proxy sends its requests to the others) and `start N`
/// brings it back on its address, so failover can be shown without a
/// second process (review35c 3).
#[test]
fn a_demo_backend_is_stopped_and_started_by_a_typed_line() {
    use std::io::Write;
    let (mut child, lines) = spawn_demo(Stdio::piped(), Stdio::null());
    let mut typed = child.stdin.take().unwrap();
    // Killed if an assertion fails before the stop below.
    let mut child = Killed(child);
    // The first line holding `needle`, within 20 s.
    let wait_for = |needle: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no line with {needle:?}");
    };
    // The banner: the proxy, then each backend's address.
    let banner = wait_for(" behind http://");
    let proxy = banner.split("http://").nth(1).unwrap().trim().to_owned();
    let first = wait_for("backend-1  http://");
    let backend_1 = first.split("http://").nth(1).unwrap().trim().to_owned();

    writeln!(typed, "stop 1").unwrap();
    wait_for("backend-1 stopped");
    assert!(
        std::net::TcpStream::connect(&backend_1).is_err(),
        "backend-1 still accepts"
    );
    for _ in 0..6 {
        let answer = http_get(&proxy, "/health").to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(!answer.contains("x-backend: backend-1"), "{answer}");
    }

    writeln!(typed, "stop 9").unwrap();
    wait_for("there is no backend-9");
    writeln!(typed, "start 1").unwrap();
    wait_for("backend-1 started");
    assert!(
        std::net::TcpStream::connect(&backend_1).is_ok(),
        "backend-1 is not back"
    );
    writeln!(typed, "status").unwrap();
    assert!(wait_for("backend-1  http://").ends_with("running"));

    stop_with(&mut child.0, "-TERM");
}

/// A minimal HTTP/1.1 GET over std's TcpStream, read to close.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

/// A signal sent as soon as the port answers, as a supervisor's stop may
/// be: SIGHUP reloads and SIGTERM drains, never the default action that
/// kills the process (the handlers are installed before the first bind).
#[test]
fn signals_as_soon_as_the_port_answers_are_handled_not_fatal() {
    let dir = std::env::temp_dir().join(format!("portico-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let file = dir.join("portico.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[upstream]]\nname = \"a\"\nbackends = [\"127.0.0.1:9\"]\n\n\
             [[route]]\npath_prefix = \"/\"\nupstream = \"a\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(PORTICO)
        .args(["--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // bash's own connect and kill, with no process started in between:
    // the signals land within microseconds of the port answering.
    let sent = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "for _ in $(seq 200000); do \
               if exec 3<>/dev/tcp/127.0.0.1/{port}; then kill -HUP {pid}; kill -TERM {pid}; exit 0; fi; \
             done 2>/dev/null; exit 1",
            pid = child.id()
        ))
        .status()
        .unwrap();
    assert!(sent.success(), "portico never listened");
    let status = exit_of(&mut child, "SIGTERM");
    // Killed by a signal, the status has no code.
    assert_eq!(status.code(), Some(0), "portico ended with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that leaves mid-download leaves the rest of the body in the
/// backend connection's read buffer: that is no stray bytes from the
/// backend, and no warning blames it (review30a F4). The backend streams
/// a chunked body in 8 KiB chunks, as the review's did.
#[test]
fn a_download_left_midway_blames_no_backend() {
    use std::io::{Read, Write};
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin_addr = origin.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in origin.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                let mut chunk = b"2000\r\n".to_vec();
                chunk.extend_from_slice(&[b'c'; 8192]);
                chunk.extend_from_slice(b"\r\n");
                for _ in 0..2500 {
                    if stream.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            });
        }
    });
    let config = behind(origin_addr, "", "");
    let mut run = portico_on("left", &config, None);
    for _ in 0..3 {
        let mut stream = connect(&run);
        write!(stream, "GET /file HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = 0;
        let mut buf = [0u8; 65536];
        while got < 1_000_000 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
        drop(stream);
        // Its access line: the client left, so its backend connection
        // has been let go by then.
        line_with(&run.log, "client_gone", &mut run.seen);
    }
    no_stray_bytes_warning(run);
}

/// A stale-while-revalidate refresh that fails is logged: its client was
/// answered from the stale copy, so nothing else said the backend failed
/// (review32a L5).
#[test]
fn a_failed_background_refresh_is_logged() {
    // The first answer is stale on arrival (Age past max-age) with a
    // window to serve it in; every later one is a 500.
    let origin_addr = origin(|n| {
        if n == 0 {
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=1, stale-while-revalidate=600\r\nAge: 5\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
    });
    let config = behind(origin_addr, "retries = 0\n", "[cache]\n");
    let mut run = portico_on("swr", &config, None);
    for want in ["stored", "stale-while-revalidate"] {
        let mut stream = connect(&run);
        let (status, _) = ask(&mut stream, "/page");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        line_with(&run.log, want, &mut run.seen);
    }
    let line = line_with(&run.log, "background refresh failed", &mut run.seen);
    assert!(line.contains("500"), "{line}");
    assert!(line.contains("/page"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A body the backend breaks is warned about with what broke it: hyper
/// says "error reading a body from connection" of a reset, an early close
/// and a bad chunk alike (review32c F4). The warning carries the client
/// and the request's id, as the access line does (review35b F2).
#[test]
fn a_broken_body_s_warning_says_what_broke_it() {
    let (mut run, _stream) = asked_with_id(
        "broke",
        |_| b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        "",
        "pair-me-43",
    );
    let line = line_with(&run.log, "broke the response body", &mut run.seen);
    assert!(line.contains("chunk"), "{line}");
    assert!(line.contains("\"request_id\":\"pair-me-43\""), "{line}");
    assert!(line.contains("\"client\":\"127.0.0.1\""), "{line}");
    // A second such body within ten seconds is in its access line only,
    // not one warning more (chaos55 L6).
    let mut again = connect(&run);
    let head = "GET /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: pair-me-44\r\n\r\n";
    std::io::Write::write_all(&mut again, head.as_bytes()).unwrap();
    let access = line_with(&run.log, "pair-me-44", &mut run.seen);
    assert!(access.contains("backend_broken"), "{access}");
    std::thread::sleep(Duration::from_millis(300));
    run.seen.extend(run.log.try_iter());
    let warnings = run
        .seen
        .iter()
        .filter(|l| l.contains("broke the response body"));
    assert_eq!(warnings.count(), 1, "{:#?}", run.seen);
    // What hyper read past the bad chunk is the rest of the broken body,
    // not bytes sent after a response.
    no_stray_bytes_warning(run);
}

/// A backend that sends more than its response's length is warned of,
/// with its address, once in ten seconds however often it does so; the
/// client gets the response as its length said (chaos55 L2: hyper ends
/// such a connection with an error of its own, which was logged at DEBUG,
/// and the warning never fired).
#[test]
fn bytes_after_a_response_are_warned_of() {
    use std::io::{Read, Write};
    let origin_addr = origin(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA");
    let config = behind(origin_addr, "", "");
    let mut run = portico_on("overrun", &config, None);
    for id in ["overrun-1", "overrun-2"] {
        let mut stream = connect(&run);
        let head = format!(
            "GET /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
        line_with(&run.log, id, &mut run.seen);
    }
    std::thread::sleep(Duration::from_millis(300));
    run.seen.extend(run.log.try_iter());
    let warnings: Vec<_> = run
        .seen
        .iter()
        .filter(|l| l.contains("no request asked for"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:#?}", run.seen);
    assert!(
        warnings[0].contains(&origin_addr.to_string()),
        "{}",
        warnings[0]
    );
    let _ = std::fs::remove_dir_all(run.dir);
}

/// The access line names the host the request was routed and cached by:
/// an absolute-form target's, not the Host field the client set beside it
/// (review34e 5: a purge by the logged host found nothing).
#[test]
fn the_access_line_names_an_absolute_form_target_s_host() {
    let origin_addr =
        origin(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    let config = behind(origin_addr, "", "");
    let mut run = portico_on("absolute", &config, None);
    let mut stream = connect(&run);
    let head = b"GET http://site.example/abs HTTP/1.1\r\nHost: other.example\r\n\r\n";
    std::io::Write::write_all(&mut stream, head).unwrap();
    let line = line_with(&run.log, "/abs", &mut run.seen);
    assert!(line.contains(r#""host":"site.example""#), "{line}");
    // And the protocol, as nginx's $server_protocol (review34a F7).
    assert!(line.contains(r#""proto":"HTTP/1.1""#), "{line}");
    // And the route, as the metrics label it (ops56 L6).
    assert!(line.contains(r#""route":""#), "{line}");
    assert!(!line.contains(r#""route":"-""#), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// An HTTP/2 client that reads nothing at all is dropped for that, its
/// streams' lines ending `client_gone`: they said `client_stalled`, as if
/// it had kept their windows shut (review34b F3).
#[test]
fn an_http2_client_reading_nothing_is_gone_not_stalled() {
    use std::io::Write;
    fn big(_: usize) -> &'static [u8] {
        static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BIG.get_or_init(|| {
            let body = 8 << 20;
            let mut answer =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {body}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + body, b'x');
            answer
        })
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    };
    let config =
        behind(origin(big), "", "").replacen("[server]\n", "[server]\nidle_timeout = \"1s\"\n", 1);
    let mut run = portico_on("h2noread", &config, None);
    let mut stream = connect(&run);
    // Windows opened wide, four downloads asked for, nothing read.
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    start.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    let mut fields = vec![0x82, 0x86, 0x04, 4];
    fields.extend_from_slice(b"/big");
    fields.extend_from_slice(&[0x01, 1, b'a']);
    for id in [1, 3, 5, 7] {
        start.extend(frame(0x1, 0x5, id, &fields));
    }
    stream.write_all(&start).unwrap();
    // The sockets' buffers may take a whole response or two (`done`).
    let mut gone = 0;
    for _ in 0..4 {
        let line = line_with(&run.log, "\"path\":\"/big\"", &mut run.seen);
        assert!(!line.contains("client_stalled"), "{line}");
        assert!(line.contains(r#""proto":"HTTP/2.0""#), "{line}");
        gone += usize::from(line.contains("client_gone"));
    }
    assert!(gone > 0, "{:#?}", run.seen);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A backend that resets the connection under an upload it did not read,
/// with no answer, is logged as having reset it: hyper reports only the
/// end of the read that followed ("connection closed before message
/// completed"), and the clue was lost (review33c L4).
#[test]
fn a_reset_under_an_upload_is_logged_as_one() {
    // Reads the head, answers nothing and, once some of the upload has
    // come, drops the rest unread: a reset (with nothing unread it would
    // be a close).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin_addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1024]);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let config = behind(origin_addr, "", "");
    let mut run = portico_on("reset", &config, None);
    let mut stream = connect(&run);
    let mut upload = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n";
        let _ = std::io::Write::write_all(&mut upload, head);
        let _ = std::io::Write::write_all(&mut upload, &vec![b'x'; 8 << 20]);
    });
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 502");
    let line = line_with(&run.log, "broke the response", &mut run.seen);
    assert!(line.contains("reset while the request was sent"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A head that does not parse is said as what it is, as portico's
/// `portico_upstream_errors_total` counts it (`bad_response`), not as a
/// body broken off (lb55 L5).
#[test]
fn a_head_that_does_not_parse_is_said_so() {
    let (mut run, mut stream) = asked_with_id(
        "badhead",
        |_| b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        "retries = 0\n",
        "bad-head-1",
    );
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 502");
    let line = line_with(&run.log, "proxy error", &mut run.seen);
    assert!(
        line.contains("sent a response portico cannot relay"),
        "{line}"
    );
    assert!(!line.contains("broke the response"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A body the backend breaks off is not stored, and its access line says
/// so, though the Cache-Status the client got, sent before the body,
/// said `stored` (review32c F5).
#[test]
fn a_broken_body_s_access_line_does_not_say_stored() {
    let origin_addr = origin(|_| {
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\n0123456789"
    });
    let config = behind(origin_addr, "", "[cache]\n");
    let mut run = portico_on("notstored", &config, None);
    let mut stream = connect(&run);
    std::io::Write::write_all(&mut stream, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let line = line_with(&run.log, "backend_broken", &mut run.seen);
    assert!(line.contains("detail=body-not-whole"), "{line}");
    assert!(!line.contains("stored"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A body without a length that outgrows `max_object_size` is not
/// stored, and its access line says why, though the Cache-Status the
/// client got, sent before the body, said `stored` (review32f F2).
#[test]
fn a_body_that_outgrows_max_object_size_logs_why_it_was_not_stored() {
    fn answer(_: usize) -> &'static [u8] {
        static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        ANSWER.get_or_init(|| {
            let mut answer = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
            for _ in 0..20 {
                answer.extend_from_slice(b"1000\r\n");
                answer.extend_from_slice(&[b'x'; 0x1000]);
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(b"0\r\n\r\n");
            answer
        })
    }
    let config = behind(
        origin(answer),
        "",
        "[cache]\nmax_size = \"1MiB\"\nmax_object_size = \"64KiB\"\n",
    );
    let mut run = portico_on("toolarge", &config, None);
    let mut stream = connect(&run);
    std::io::Write::write_all(&mut stream, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let line = line_with(&run.log, "/big", &mut run.seen);
    assert!(line.contains("fwd=miss; detail=too-large"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A log reader that stops reading stalls no request: lines wait in
/// portico's queue, written once the reader reads again, where a write to
/// the full pipe blocked the worker that logged (review36c F3).
#[test]
fn a_stalled_log_reader_holds_up_no_request() {
    let origin_addr = origin(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let dir = std::env::temp_dir().join(format!("portico-stalledlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portico.toml");
    std::fs::write(&file, behind(origin_addr, "", "")).unwrap();
    let mut child = Command::new(PORTICO)
        .args([
            "-c",
            file.to_str().unwrap(),
            "--threads",
            "1",
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let _child = Killed(child);
    let mut line = String::new();
    while !line.contains("listening (http") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the log ended");
    }
    let addr = addr_in(&line);
    // Nothing more is read: ~2000 access lines fill the pipe many times.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // `ask` writes its head in pieces.
    stream.set_nodelay(true).unwrap();
    for i in 0..2000 {
        let (status, _) = ask(&mut stream, &format!("/r{i}"));
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    // Read again: every line is there, in order.
    let mut last = None;
    while last != Some(1999) {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the log ended");
        if line.contains("portico::access") {
            let n: usize = line
                .split("\"path\":\"/r")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(n, last.map_or(0, |l| l + 1), "{line}");
            last = Some(n);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload says what it changed among the upstreams, and the resets an
/// operator would otherwise take for a bug: throttling budgets refilled,
/// backends found down tried again (review36a L4).
#[test]
fn a_reload_says_what_it_changed() {
    let origin_addr = origin(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let limited = "[rate_limit]\nrequests_per_second = 5\nburst = 5\n";
    let config = behind(origin_addr, "", "rate_limit = true\n") + limited;
    let mut run = portico_on("reloadsays", &config, None);
    let file = run.dir.join("portico.toml");
    let hup = |config: String| {
        std::fs::write(&file, config).unwrap();
        hang_up(&run.proxy.0);
    };
    hup(behind(origin_addr, "retries = 0\n", "rate_limit = true\n")
        + "[[upstream]]\nname = \"new\"\nbackends = [\"127.0.0.1:9\"]\n"
        + &limited.replace("burst = 5", "burst = 6"));
    let line = line_with(&run.log, "upstreams changed by the reload", &mut run.seen);
    assert!(
        line.contains("\"added\":\"new\"") && line.contains("\"changed\":\"o\""),
        "{line}"
    );
    line_with(&run.log, "every client's budget starts full", &mut run.seen);
    line_with(&run.log, "configuration reloaded", &mut run.seen);
    // Throttling taken off and put back is said too (review36d L8).
    hup(behind(origin_addr, "", ""));
    line_with(&run.log, "[rate_limit] removed", &mut run.seen);
    hup(config);
    line_with(&run.log, "[rate_limit] added", &mut run.seen);
    // And by the routes' own setting, the section kept (review37h L3).
    hup(behind(origin_addr, "", "rate_limit = false\n") + limited);
    line_with(&run.log, "[rate_limit] removed", &mut run.seen);
    // Which backends: drained, added (review41b L3).
    let plain = format!("backends = [\"{origin_addr}\"]");
    let drained =
        format!("backends = [{{ addr = \"{origin_addr}\", weight = 0 }}, \"127.0.0.1:9\"]");
    // With a `slow_start`, the one added warms up over it, and says so.
    let warming = "slow_start = \"30s\"\n";
    hup(behind(origin_addr, warming, "").replace(&plain, &drained));
    let line = line_with(&run.log, "backends changed by the reload", &mut run.seen);
    assert!(
        line.contains("\"upstream\":\"o\"")
            && line.contains(&format!("\"drained\":\"{origin_addr} (weight 1)\""))
            && line.contains("\"added\":\"127.0.0.1:9\"")
            && line.contains("\"slow_start\":\"30s\""),
        "{line}"
    );
    // A backup made, and a cap given, move traffic too (review44c L1).
    let backup = format!(
        "backends = [{{ addr = \"{origin_addr}\", weight = 0 }}, \
         {{ addr = \"127.0.0.1:9\", backup = true, max_conns = 4 }}]"
    );
    hup(behind(origin_addr, "", "").replace(&plain, &backup));
    let line = line_with(&run.log, "backends changed by the reload", &mut run.seen);
    assert!(
        line.contains("\"made_backup\":\"127.0.0.1:9\"")
            && line.contains("\"max_conns\":\"127.0.0.1:9 (none to 4)\""),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(run.dir);
}

/// At `max_connections`, the warning names the cap and the clients
/// waiting in the listen queue, as `ss -ltn` shows them (review33d F5).
#[test]
fn the_max_connections_warning_counts_the_clients_waiting() {
    let origin_addr = origin(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let config =
        behind(origin_addr, "", "").replacen("[server]\n", "[server]\nmax_connections = 1\n", 1);
    let mut run = portico_on("maxconn", &config, None);
    // A head begun and not finished: a place held, not an idle one.
    let mut holding = connect(&run);
    std::io::Write::write_all(&mut holding, b"GET /x HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut waiting = connect(&run);
    std::io::Write::write_all(&mut waiting, b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let line = line_with(&run.log, "server.max_connections", &mut run.seen);
    assert!(line.contains("\"max_connections\":1"), "{line}");
    assert!(line.contains("\"queued\":1"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A cap the open-file limit cannot hold with a backend connection for
/// each client connection is warned about at start, as nginx and HAProxy
/// warn (review33d F6).
#[test]
fn a_max_connections_past_the_open_file_limit_is_warned_about() {
    let config = behind("127.0.0.1:9".parse().unwrap(), "", "").replacen(
        "[server]\n",
        "[server]\nmax_connections = 500\n",
        1,
    );
    let run = portico_on("fdcap", &config, Some("-n 200"));
    // Said before the listeners are up, so among what the start read.
    let line = run
        .seen
        .iter()
        .find(|l| l.contains("leaves no room for backend connections"))
        .unwrap_or_else(|| panic!("no warning in {:#?}", run.seen));
    assert!(line.contains("\"open_file_limit\":200"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// portico (named for `tag`) behind an origin answering `answer`, with
/// `upstream_extra` in its upstream, asked `GET /x` with `X-Request-Id:
/// id`; the run and the client's connection, left open.
fn asked_with_id(
    tag: &str,
    answer: fn(usize) -> &'static [u8],
    upstream_extra: &str,
    id: &str,
) -> (Started, std::net::TcpStream) {
    let config = behind(origin(answer), upstream_extra, "");
    let run = portico_on(tag, &config, None);
    let mut stream = connect(&run);
    let head = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\n\
         User-Agent: probe \"1.0\"\r\nReferer: http://r.example/\r\n\r\n"
    );
    std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
    (run, stream)
}

/// The warnings about a request's failed attempts carry its id, as its
/// access line does, so they can be paired under concurrency
/// (review32c F4).
#[test]
fn a_failed_request_s_warnings_carry_its_id() {
    // Closes every connection without an answer.
    let (mut run, _stream) = asked_with_id("reqid", |_| b"", "retries = 1\n", "pair-me-42");
    for needle in ["attempt failed; retrying", "proxy error", "portico::access"] {
        let line = line_with(&run.log, needle, &mut run.seen);
        assert!(line.contains("\"request_id\":\"pair-me-42\""), "{line}");
        // And the same client, an address without its port (review36d L8).
        assert!(line.contains("\"client\":\"127.0.0.1\""), "{line}");
    }
    // The access line ends as nginx's `combined` does (review37c L1).
    let access = run
        .seen
        .iter()
        .find(|l| l.contains("portico::access"))
        .unwrap();
    assert!(
        access.contains(r#""referer":"http://r.example/","user_agent":"probe \"1.0\"""#),
        "{access}"
    );
    // Past the retry budget (100 a window + 20% of requests), a retry it
    // refuses is said in the request's warning, where nothing told why
    // there was none.
    for _ in 0..130 {
        let mut stream = connect(&run);
        let (status, _) = ask(&mut stream, "/y");
        assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    }
    line_with(&run.log, "retry budget spent", &mut run.seen);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A config for portico on loopback in front of `origin` alone, as
/// upstream `o` (with `upstream_extra` lines), behind one route (and
/// `tail`, another section).
fn behind(origin: std::net::SocketAddr, upstream_extra: &str, tail: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"o\"\nbackends = [\"{origin}\"]\n{upstream_extra}\
         [[route]]\nupstream = \"o\"\n{tail}"
    )
}

/// A client connection to `run`'s proxy, its reads bounded.
fn connect(run: &Started) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(&run.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Stops `run` a moment on and finds in its whole log no warning of bytes
/// a backend sent after its response.
fn no_stray_bytes_warning(mut run: Started) {
    std::thread::sleep(Duration::from_millis(500));
    drop(run.proxy);
    run.seen.extend(run.log.try_iter());
    assert!(
        !run.seen.iter().any(|l| l.contains("no request asked for")),
        "{:#?}",
        run.seen
    );
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A refused admin call is warned of once in ten seconds, with how many
/// went unsaid: a token being guessed wrote a line per try (ops56 L2).
#[test]
fn refused_admin_calls_are_warned_of_once_in_a_while() {
    use std::io::{Read, Write};
    let token = std::env::temp_dir().join(format!("portico-refused-{}.token", std::process::id()));
    std::fs::write(&token, "0123456789abcdef0123").unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n",
        token.display()
    );
    let mut run = portico_on("refused", &config, None);
    let admin = run
        .seen
        .iter()
        .find(|l| l.contains("admin listening"))
        .map(|l| addr_in(l))
        .expect("the admin address");
    for guess in ["one", "two", "three"] {
        let mut stream = std::net::TcpStream::connect(&admin).unwrap();
        write!(
            stream,
            "POST /reload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {guess}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    std::thread::sleep(Duration::from_millis(300));
    run.seen.extend(run.log.try_iter());
    let refusals = run.seen.iter().filter(|l| l.contains("admin call refused"));
    assert_eq!(refusals.count(), 1, "{:#?}", run.seen);
    let _ = std::fs::remove_file(token);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A short admin token is warned about at start (review31b note).
#[test]
fn a_short_admin_token_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("portico-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin.token"), "ab\n").unwrap();
    // Trusting every address is warned of too (review36a).
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"0.0.0.0/0\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         token_file = \"admin.token\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
    let run = portico_on("token", config, None);
    // Said before the listeners are up, so among what the start read,
    // each with the place of its key, as `check` names it.
    let said = |what: &str| {
        run.seen
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what} in {:#?}", run.seen))
    };
    let line = said("0.0.0.0/0, every address");
    assert!(line.contains("portico.toml:3:1\""), "{line}");
    let line = said("short enough to guess");
    assert!(line.contains("\"length\":2"), "{line}");
    assert!(line.contains("portico.toml:6:1\""), "{line}");
    // `check` says it too, before any start (review35d 6).
    let out = Command::new(PORTICO)
        .args(["check", "-c"])
        .arg(run.dir.join("portico.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(
            "portico.toml:6:1: admin.token_file: the admin token is short enough to guess"
        ),
        "{said}"
    );
    assert!(said.contains("0.0.0.0/0, every address"), "{said}");
    // A reload asked for by the admin API answers with the warnings it
    // logged, where they were in the log only (review36a L4).
    let admin = run.admin_addr();
    let mut stream = std::net::TcpStream::connect(&admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ab\r\n\
          Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        body.starts_with("reloaded, with warnings (as logged):\n"),
        "{body}"
    );
    assert!(body.contains("0.0.0.0/0, every address"), "{body}");
    assert!(!body.contains("configuration reloaded"), "{body}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A backend on loopback that reads each request's head and writes
/// `answer(n)` for its `n`th connection (from 0), then closes.
fn origin(answer: fn(usize) -> &'static [u8]) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = origin.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, stream) in origin.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(answer(n));
        }
    });
    addr
}

/// A child process killed when dropped, so a failed test leaves none.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGHUP to `child`: a reload.
fn hang_up(child: &std::process::Child) {
    let sent = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A child whose stderr lines (its JSON log) arrive on a channel.
fn logging(mut command: Command) -> (Killed, std::sync::mpsc::Receiver<String>) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Killed(child), rx)
}

/// `text` written to `name` in a directory of its own, named for `tag`:
/// the directory and the file.
fn written(tag: &str, name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("portico-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

/// `portico check` of `file`.
fn checked(file: &std::path::Path) -> std::process::Output {
    Command::new(PORTICO)
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap()
}

/// portico started as a child on `config` (written to a directory of
/// its own, named for `tag`), logging JSON; with `ulimit`, under those
/// limits (`-n 48`). The child, its log, the address it serves on, the lines
/// read so far and the directory.
fn portico_on(tag: &str, config: &str, ulimit: Option<&str>) -> Started {
    let (dir, file) = written(tag, "portico.toml", config);
    let run = format!(
        "{PORTICO} -c {} --threads 1 --log-format json",
        file.display()
    );
    let mut command = Command::new("sh");
    match ulimit {
        Some(flags) => command.args(["-c", &format!("ulimit {flags} && exec {run}")]),
        None => command.args(["-c", &format!("exec {run}")]),
    };
    let (proxy, log) = logging(command);
    let mut seen = Vec::new();
    let addr = addr_in(&line_with(&log, "listening (http", &mut seen));
    Started {
        proxy,
        log,
        addr,
        seen,
        dir,
    }
}

/// What [`portico_on`] started.
struct Started {
    proxy: Killed,
    log: std::sync::mpsc::Receiver<String>,
    addr: String,
    seen: Vec<String>,
    dir: std::path::PathBuf,
}

impl Started {
    /// The admin listener's address, from the start's log.
    fn admin_addr(&self) -> String {
        self.seen
            .iter()
            .find(|l| l.contains("admin listening"))
            .map(|l| addr_in(l))
            .expect("the admin listener's address")
    }
}

/// Waits (bounded) for a log line containing `needle`; returns it.
fn line_with(
    log: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(line) = log.recv_timeout(Duration::from_millis(100)) {
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }
    panic!("no log line with {needle:?} in {seen:#?}");
}

/// The `addr` field of a JSON log line.
fn addr_in(line: &str) -> String {
    let at = line.find("\"addr\":\"").expect("an addr field") + 8;
    line[at..].split('"').next().unwrap().to_owned()
}

/// One request on an open connection; the status line and the body.
fn ask(stream: &mut std::net::TcpStream, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a length");
            if body.len() >= length {
                return (head.lines().next().unwrap().to_owned(), body.to_owned());
            }
        }
    }
}

/// portico out of file descriptors answers 503 for itself and blames no
/// backend: its active checks count neither way, so the backends are up
/// the moment descriptors are free again. They used to be marked down
/// (and passively ejected) for portico's own EMFILE, and requests got
/// `503 no healthy backend` until `rise` checks passed (review30a F2).
#[test]
fn running_out_of_file_descriptors_takes_no_backend_down() {
    let (backend, backend_log) = logging({
        let mut c = Command::new(env!("CARGO_BIN_EXE_order-backend"));
        c.args([
            "--listen",
            "127.0.0.1:0",
            "--name",
            "b1",
            "--threads",
            "1",
            "--log-format",
            "json",
        ]);
        c
    });
    let backend_addr = addr_in(&line_with(&backend_log, "\"listening\"", &mut Vec::new()));
    let config = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstream]]\nname = \"warm\"\nbackends = [\"{backend_addr}\"]\n\
             [[upstream]]\nname = \"cold\"\nbackends = [\"{backend_addr}\"]\n\
             [upstream.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\nrise = 5\nfall = 2\n\
             [[route]]\npath_prefix = \"/health\"\nupstream = \"warm\"\n\
             [[route]]\nupstream = \"cold\"\n"
    );
    let mut run = portico_on("emfile", &config, Some("-n 48"));
    let mut kept = std::net::TcpStream::connect(&run.addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(ask(&mut kept, "/health").0.contains(" 200 "));
    // Idle connections until portico can accept no more.
    let idle: Vec<_> = (0..64)
        .map(|_| std::net::TcpStream::connect(&run.addr).unwrap())
        .collect();
    line_with(&run.log, "accept failed", &mut run.seen);
    // Clients of the admin listener, which cannot take them either.
    let admin = run.admin_addr();
    let _knocking: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    // Time for the checks of `cold` to fail `fall` times over, as they did.
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = ask(&mut kept, "/users/1/orders");
    assert!(status.contains(" 503 "), "{status}");
    assert!(body.contains("out of connections"), "{body}");
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = ask(&mut kept, "/users/1/orders");
        assert!(!body.contains("no healthy backend"), "{status} {body}");
        if status.contains(" 200 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((run.proxy, backend));
    run.seen.extend(run.log.try_iter());
    assert!(
        !run.seen
            .iter()
            .any(|l| l.contains("backend down") || l.contains("ejected")),
        "{:#?}",
        run.seen
    );
    // The admin listener said so once too, not at each 50 ms retry
    // (review34b F4: twenty lines a second).
    let admin_failures = run
        .seen
        .iter()
        .filter(|l| l.contains("accept") && l.contains(&admin))
        .count();
    assert!((1..=3).contains(&admin_failures), "{:#?}", run.seen);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A head that did not arrive in time is logged with the time it was
/// given, not `duration_ms=0` (review30c F3).
#[test]
fn a_head_timed_out_is_logged_with_the_time_it_had() {
    use std::io::{Read, Write};
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\nrequest_header_timeout = \"300ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
    let mut run = portico_on("408", config, None);
    let mut stream = connect(&run);
    stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let _ = stream.read(&mut [0u8; 64]);
    let line = line_with(&run.log, "\"status\":408", &mut run.seen);
    drop(run.proxy);
    assert!(line.contains("\"duration_ms\":300.0"), "{line}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// A request that waited in line under `max_conns` says how long in its
/// access line (`queue_ms`, HAProxy's `Tw`), and one turned away is told
/// apart from "no healthy backend" in its warning and its answer
/// (review44a L3).
#[test]
fn a_request_turned_away_for_want_of_room_logs_its_wait() {
    use std::io::{Read, Write};
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || silent.accept().map(|(stream, _)| stream));
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [{{ addr = \"{backend}\", max_conns = 1 }}]\n\
         queue_timeout = \"200ms\"\n[[route]]\nupstream = \"u\"\n"
    );
    let mut run = portico_on("queue", &config, None);
    let mut first = connect(&run);
    first
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // The backend has it, and holds the only slot.
    let _first_at_backend = held.join().unwrap().unwrap();
    let mut second = connect(&run);
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 1024];
    let n = second.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.ends_with("every backend is busy\n"), "{answer}");
    let line = line_with(&run.log, "\"path\":\"/second\"", &mut run.seen);
    // At least its `queue_timeout`: a bound of the wait, not its speed.
    let waited: f64 = line
        .split("\"queue_ms\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no queue_ms in {line}"));
    assert!(waited >= 200.0, "{line}");
    let warning = "every backend is at its max_conns (waited 200ms for room)";
    if !run.seen.iter().any(|seen| seen.contains(warning)) {
        line_with(&run.log, warning, &mut run.seen);
    }
    drop(run.proxy);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// The soft limit on open files is raised to the hard one at start: the
/// usual 1024 runs out at ~500 clients, two sockets each.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_one() {
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
    let ours = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = ours
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .unwrap_or(0);
    if hard <= 256 {
        // Nothing to raise it to here.
        return;
    }
    let run = portico_on("nofile", config, Some("-Sn 256"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", run.proxy.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "{line}");
    assert_ne!(numbers[0], "256", "{line}");
    drop(run.proxy);
    let _ = std::fs::remove_dir_all(run.dir);
}

/// SIGUSR1 and SIGUSR2 (logrotate's reopen for nginx, HAProxy's soft stop)
/// are logged and ignored, where their default action killed portico at
/// once; SIGQUIT, nginx's graceful stop, drains as SIGTERM does
/// (review31d F4).
#[test]
fn user_signals_are_ignored_and_sigquit_drains() {
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"u\"\nbackends = [\"127.0.0.1:9\"]\n[[route]]\nupstream = \"u\"\n";
    let mut run = portico_on("usr", config, None);
    let pid = run.proxy.0.id().to_string();
    for (signal, name) in [("-USR1", "SIGUSR1"), ("-USR2", "SIGUSR2")] {
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success());
        let line = line_with(&run.log, "ignored", &mut run.seen);
        assert!(line.contains(name), "{line}");
    }
    let mut stream = connect(&run);
    // No backend listens on port 9: answered, by a live proxy.
    let (status, _) = ask(&mut stream, "/");
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    drop(stream);
    let sent = Command::new("kill").args(["-QUIT", &pid]).status().unwrap();
    assert!(sent.success());
    let line = line_with(&run.log, "stop signal received", &mut run.seen);
    assert!(line.contains("SIGQUIT"), "{line}");
    line_with(&run.log, "shutting down", &mut run.seen);
    let status = exit_of(&mut run.proxy.0, "SIGQUIT");
    assert_eq!(status.code(), Some(0), "portico ended with {status}");
    let _ = std::fs::remove_dir_all(run.dir);
}

/// Waits (bounded) for `child` to exit after `signal`; its status.
fn exit_of(child: &mut std::process::Child, signal: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "portico did not stop after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
