//! A real mosquitto broker on a free loopback port, and a `mosquitto_sub` watching it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Proc, free_tcp_port};

/// A mosquitto broker on a free loopback port, without persistence.
pub struct Broker {
    pub port: u16,
    conf: std::path::PathBuf,
    proc: Option<Proc>,
}

impl Broker {
    pub fn start(dir: &std::path::Path) -> Broker {
        Broker::start_with(dir, "")
    }

    /// A broker whose first listener (plain, for the test's own clients) is followed by
    /// `more` configuration, such as further listeners.
    pub fn start_with(dir: &std::path::Path, more: &str) -> Broker {
        // A free port can be taken again before mosquitto binds it (suites run side by side):
        // then mosquitto exits, and another port is tried.
        for _ in 0..5 {
            let port = free_tcp_port();
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings false\nallow_anonymous true\npersistence false\n\
                     listener {port} 127.0.0.1\n{more}"
                ),
            )
            .unwrap();
            let mut b = Broker {
                port,
                conf,
                proc: None,
            };
            if b.try_resume() {
                return b;
            }
        }
        panic!("mosquitto exited at start five times (ports taken?)");
    }

    /// Start (again) on the same port.
    pub fn resume(&mut self) {
        assert!(
            self.try_resume(),
            "mosquitto exited at start on port {}",
            self.port
        );
    }

    /// Start mosquitto and wait until it accepts connections; false if it exited first.
    fn try_resume(&mut self) -> bool {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto: {e}; install mosquitto (tests/run.sh does)"));
        let port = self.port;
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            // Connected, and still running: it is this mosquitto that answered.
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && child.try_wait().unwrap().is_none()
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(Proc(child));
        true
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `mosquitto_pub` one message; `args` adds flags such as `-r` or MQTT 5 properties.
    pub fn publish(&self, topic: &str, payload: &str, args: &[&str]) {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-t", topic, "-m", payload])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {topic}");
    }
}

/// A `mosquitto_sub` on `#` (MQTT 5, retain flags as published) writing
/// `retain|topic|correlation|payload` lines.
pub struct Watch {
    _proc: Proc,
    path: std::path::PathBuf,
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub retained: bool,
    pub topic: String,
    pub correlation: String,
    pub payload: String,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", self.topic, self.payload))
    }
}

impl Watch {
    pub fn start(broker: &Broker, dir: &std::path::Path, name: &str) -> Watch {
        let path = dir.join(format!("watch-{name}.txt"));
        let out = std::fs::File::create(&path).unwrap();
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-V", "5"])
            .args(["-t", "#", "--retain-as-published", "-F", "%r|%t|%D|%p"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let watch = Watch {
            _proc: Proc(child),
            path,
        };
        // Subscribed once a probe published now comes back (no fixed wait).
        let probe = format!("lockbridge-test/probe/{name}");
        let t = Instant::now();
        while !watch.all().iter().any(|m| m.topic == probe) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mosquitto_sub never subscribed"
            );
            broker.publish(&probe, "probe", &[]);
            std::thread::sleep(Duration::from_millis(50));
        }
        watch
    }

    pub fn all(&self) -> Vec<Msg> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        // mosquitto_sub may be writing the last line as it is read: only whole lines count.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, '|');
                Some(Msg {
                    retained: parts.next()? == "1",
                    topic: parts.next()?.to_string(),
                    correlation: parts.next()?.to_string(),
                    payload: parts.next()?.to_string(),
                })
            })
            .collect()
    }

    /// Wait for a message matching `f`; the messages so far in the panic message otherwise.
    pub fn wait(&self, what: &str, limit: Duration, f: impl Fn(&Msg) -> bool) -> Msg {
        let t = Instant::now();
        loop {
            if let Some(m) = self.all().into_iter().find(|m| f(m)) {
                return m;
            }
            if t.elapsed() > limit {
                let seen: Vec<String> = self
                    .all()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.payload))
                    .collect();
                panic!("no {what} within {limit:?}; seen:\n{}", seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The terminal report of command `id` on `topic`.
    pub fn outcome(&self, topic: &str, id: &str) -> Value {
        self.wait(
            &format!("the outcome of {id}"),
            Duration::from_secs(15),
            |m| {
                m.topic == topic
                    && serde_json::from_str::<Value>(&m.payload)
                        .is_ok_and(|v| v["id"] == id && v["step"] == "done")
            },
        )
        .json()["outcome"]
            .clone()
    }
}
