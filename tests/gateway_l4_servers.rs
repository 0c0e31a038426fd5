//! The TCP gateway in front of real servers with real clients: TLS connections routed by
//! their server name to nginx (self-signed, never terminated by the gateway) and fetched
//! with curl; FTP through the gateway to vsftpd with curl, passive and extended passive —
//! listing, upload and download of 5 MB byte-exact, the data connections counted in the
//! control connection's class, a data connection from another address refused, active
//! mode refused with a clear reply. nginx, vsftpd, curl and openssl are installed by the
//! test when missing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `n` consecutive free ports.
fn free_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

async fn wait_port(addr: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            TcpStream::connect(addr).await.is_ok()
        })
        .await,
        "nothing listens on {addr}"
    );
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run a client");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_are_routed_by_server_name_without_terminating_tls() {
    let nginx = tools::ensure("nginx", "nginx-light");
    let openssl = tools::ensure("openssl", "openssl");
    let curl = tools::ensure("curl", "curl");
    let dir = temp_path("nginx");
    std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=a.example",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")));
    assert!(ok, "openssl: {out}");
    let port = free_port();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {d}/cert.pem;\n\
             ssl_certificate_key {d}/key.pem;\n    location / {{ return 200 \"tls $ssl_server_name\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .expect("nginx.conf");
    let _nginx = Server(
        Command::new(&nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let tls: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_port(tls).await;

    let cfg = format!(
        r#"
[[listener]]
name = "tls"
address = "127.0.0.1:0"
protocol = "tcp"
inspect_ms = 1000
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "nginx"
addresses = ["{tls}"]
[[class]]
name = "a"
backend = "nginx"
[[class]]
name = "b"
backend = "nginx"
[[class]]
name = "other"
backend = "nginx"
[[chain]]
name = "sni"
default = {{ class = "other" }}
[[chain.rule]]
id = "a"
host = "a.example"
target = {{ class = "a" }}
[[chain.rule]]
id = "b"
host = "*.b.example"
target = {{ class = "b" }}
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let fetch = |name: &str| {
        let resolve = format!("{name}:{}:127.0.0.1", gw.port());
        let url = format!("https://{name}:{}/", gw.port());
        run(Command::new(&curl).args(["-sk", "--max-time", "10", "--resolve", &resolve, &url]))
    };
    let (ok, body) = fetch("a.example");
    assert!(ok && body.contains("tls a.example"), "{body}");
    let (ok, body) = fetch("x.b.example");
    assert!(ok && body.contains("tls x.b.example"), "{body}");
    let (ok, body) = fetch("c.example");
    assert!(ok && body.contains("tls c.example"), "{body}");
    // openssl s_client names the server too.
    let mut s = Command::new(&openssl)
        .args(["s_client", "-quiet", "-servername", "a.example", "-connect"])
        .arg(gw.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("s_client");
    if let Some(mut stdin) = s.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n");
    }
    let out = s.wait_with_output().expect("s_client output");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls a.example"));
    let st = status(admin).await;
    assert_eq!(class_field(&st, "a", "arrivals"), 2.0, "{st:#}");
    assert_eq!(class_field(&st, "b", "arrivals"), 1.0, "{st:#}");
    assert_eq!(class_field(&st, "other", "arrivals"), 1.0, "{st:#}");
}

/// vsftpd serving `root` (anonymous, uploads into `root/upload`) on a free port, passive
/// ports of its own.
fn vsftpd(root: &Path) -> (Server, SocketAddr) {
    let bin = tools::ensure("vsftpd", "vsftpd");
    std::fs::create_dir_all(root.join("upload")).expect("ftp root");
    std::fs::create_dir_all(root.join("empty")).expect("secure chroot dir");
    // The anonymous user (`ftp`) must not own its root, and must be able to write uploads.
    let _ = Command::new("chown")
        .arg("ftp")
        .arg(root.join("upload"))
        .status();
    let _ = Command::new("chmod").arg("755").arg(root).status();
    let port = free_port();
    let pasv = free_range(10);
    let conf = root.join("vsftpd.conf");
    std::fs::write(
        &conf,
        format!(
            "listen=YES\nlisten_address=127.0.0.1\nlisten_port={port}\nbackground=NO\n\
             anonymous_enable=YES\nno_anon_password=YES\nanon_root={r}\nlocal_enable=NO\n\
             write_enable=YES\nanon_upload_enable=YES\nanon_umask=022\n\
             pasv_enable=YES\npasv_min_port={pasv}\npasv_max_port={}\npasv_address=127.0.0.1\n\
             seccomp_sandbox=NO\nsecure_chroot_dir={r}/empty\nxferlog_enable=NO\n\
             vsftpd_log_file={r}/vsftpd.log\nconnect_from_port_20=NO\n",
            pasv + 9,
            r = root.display()
        ),
    )
    .expect("vsftpd.conf");
    let child = Command::new(bin)
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vsftpd");
    (
        Server(child),
        format!("127.0.0.1:{port}").parse().expect("addr"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_goes_through_the_gateway_data_connections_and_all() {
    let curl = tools::ensure("curl", "curl");
    let root = temp_path("ftp");
    std::fs::create_dir_all(&root).expect("root");
    let big: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(root.join("big.bin"), &big).expect("big file");
    let (_ftpd, ftp) = vsftpd(&root);
    wait_port(ftp).await;
    let data = free_range(20);
    let cfg = format!(
        r#"
[[listener]]
name = "ftp"
address = "127.0.0.1:0"
protocol = "ftp"
data_ports = "{data}-{}"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "ftp"
addresses = ["{ftp}"]
[[bandwidth_group]]
name = "ftp"
bytes_per_sec = 50000000
[[class]]
name = "ftp"
backend = "ftp"
bandwidth_group = "ftp"
"#,
        data + 19
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    let base = format!("ftp://{gw}");
    let dl = |extra: &[&str], out: &Path| {
        let mut c = Command::new(&curl);
        c.args(["-s", "--max-time", "30"])
            .args(extra)
            .arg(format!("{base}/big.bin"))
            .arg("-o")
            .arg(out);
        run(&mut c)
    };
    // Listing (extended passive, curl's first choice).
    let (ok, listing) =
        run(Command::new(&curl).args(["-s", "--max-time", "30", &format!("{base}/")]));
    assert!(ok && listing.contains("big.bin"), "listing: {listing}");
    // Download, extended passive and plain passive.
    let epsv = root.join("got-epsv.bin");
    let (ok, out) = dl(&[], &epsv);
    assert!(ok, "EPSV download: {out}");
    assert!(
        std::fs::read(&epsv).expect("downloaded") == big,
        "EPSV download differs"
    );
    let pasv = root.join("got-pasv.bin");
    let (ok, out) = dl(&["--disable-epsv"], &pasv);
    assert!(ok, "PASV download: {out}");
    assert!(
        std::fs::read(&pasv).expect("downloaded") == big,
        "PASV download differs"
    );
    // Upload.
    let (ok, out) = run(Command::new(&curl)
        .args(["-s", "--max-time", "30", "-T"])
        .arg(root.join("big.bin"))
        .arg(format!("{base}/upload/up.bin")));
    assert!(ok, "upload: {out}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::fs::read(root.join("upload/up.bin")).is_ok_and(|u| u == big)
        })
        .await,
        "the upload arrived differently"
    );
    // Active mode is refused, with a reply that says so.
    let (ok, out) = run(Command::new(&curl).args([
        "-sv",
        "--max-time",
        "10",
        "-P",
        "-",
        &format!("{base}/big.bin"),
        "-o",
        "/dev/null",
    ]));
    assert!(!ok, "active mode went through: {out}");
    assert!(out.contains("Active mode") || out.contains("502"), "{out}");

    // The data connections count in the control connection's class: one control and one
    // data connection per transfer, plus the listing.
    let s = status(admin).await;
    assert!(class_field(&s, "ftp", "arrivals") >= 9.0, "{s:#}");
    assert!(
        class_field(&s, "ftp", "bytes_out") >= 10.0 * 1024.0 * 1024.0,
        "{s:#}"
    );
    assert!(
        class_field(&s, "ftp", "bytes_in") >= 5.0 * 1024.0 * 1024.0,
        "{s:#}"
    );

    // A data connection from another address than the control connection's is refused.
    let control = TcpStream::connect(gw).await.expect("control");
    let mut control = BufReader::new(control);
    let mut line = String::new();
    let reply = async |c: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        tokio::time::timeout(Duration::from_secs(10), c.read_line(line))
            .await
            .expect("a reply in time")
            .expect("read");
    };
    reply(&mut control, &mut line).await;
    assert!(line.starts_with("220"), "{line}");
    control
        .get_mut()
        .write_all(b"USER anonymous\r\n")
        .await
        .expect("user");
    reply(&mut control, &mut line).await;
    if line.starts_with("331") {
        control
            .get_mut()
            .write_all(b"PASS x@\r\n")
            .await
            .expect("pass");
        reply(&mut control, &mut line).await;
    }
    assert!(line.starts_with("230"), "{line}");
    control
        .get_mut()
        .write_all(b"EPSV\r\n")
        .await
        .expect("epsv");
    reply(&mut control, &mut line).await;
    assert!(line.starts_with("229"), "{line}");
    let port: u16 = line
        .split('|')
        .nth(3)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line}"));
    assert!(
        (data..data + 20).contains(&port),
        "the reply names the gateway's port: {line}"
    );
    let stranger = TcpSocket::new_v4().expect("socket");
    stranger
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut s = stranger
        .connect(format!("127.0.0.1:{port}").parse().expect("addr"))
        .await
        .expect("connect from 127.0.0.2");
    let mut buf = [0u8; 16];
    let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(got, Ok(Ok(0)) | Ok(Err(_))),
        "the stranger was not closed: {got:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            class_field(&status(admin).await, "ftp", "refused_address") >= 1.0
        })
        .await
    );
}
