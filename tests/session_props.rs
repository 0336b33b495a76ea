//! The session core against the simulated lock, on a virtual clock: random commands with
//! random deadlines, through the seeded fault link (loss, duplication, reordering, delay, cuts)
//! and lock reboots. After every run the lock's own record is checked: no command actuated
//! twice, none after its deadline, none without a command, every command exactly one terminal
//! outcome, every `success` matched by an actuation. A failure prints its seed; add the seed to
//! `REGRESSIONS` to keep it.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code: a failed unwrap is a failed test; the figures go to the log

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Signer;
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use lockbridge::command::{Action as Act, Command, Mode, Outcome};
use lockbridge::config::LinkPolicy;
use lockbridge::fault::{Fate, FaultConfig, FaultyPipe};
use lockbridge::ptls::api::{SignedTime, op};
use lockbridge::ptls::pair::Fixture;
use lockbridge::ptls::{Channel, Client, ClientTiming};
use lockbridge::session::Job;
use lockbridge::session::core::{Action, Core, LinkChange, Now, Settings, SlotChange};
use lockbridge::sim::model::{Behaviour, ConnId, Lock, Output};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Cases that once failed: (seed, loss, duplicate, reorder, cut after frames, commands,
/// reboots), as proptest printed them.
type Case = (u64, f64, f64, f64, Option<u64>, usize, usize);
const REGRESSIONS: &[Case] = &[];

struct Link {
    conn: ConnId,
    client: Client,
    to_lock: FaultyPipe<(Channel, Vec<u8>)>,
    to_client: FaultyPipe<(Channel, Vec<u8>)>,
}

/// One actuating command as the core wrote it.
struct Sent {
    id: String,
    action: Act,
    at: Instant,
    conn: ConnId,
    /// The lock's record length when it was written: its actuation, if any, comes after.
    record_from: usize,
}

struct Run {
    f: Fixture,
    now: Instant,
    start: Instant,
    core: Core,
    lock: Lock,
    link: Option<Link>,
    faults: FaultConfig,
    streams: u64,
    rng: ChaCha8Rng,
    plan: VecDeque<(Instant, Job)>,
    reboots: VecDeque<Instant>,
    sent: Vec<Sent>,
    outcomes: BTreeMap<String, Vec<Outcome>>,
    deadlines: BTreeMap<String, Instant>,
    writes: BTreeMap<String, usize>,
}

impl Run {
    fn new(seed: u64, faults: FaultConfig, commands: usize, reboots: usize) -> Run {
        let f = Fixture::new(seed);
        let now = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let behaviour = Behaviour {
            motor_time_ms: 600,
            jam_probability: 0.05,
            ..Behaviour::default()
        };
        let lock = Lock::for_fixture(&f, behaviour, seed, now);
        let policy = if rng.next_u32() % 2 == 0 {
            LinkPolicy::Persistent
        } else {
            LinkPolicy::OnDemand
        };
        let settings = Settings {
            id: "front".into(),
            policy,
            keepalive: Duration::from_secs(20),
            idle: Duration::from_secs(5),
            refresh: Duration::from_secs(300),
            presence: None,
            queue_depth: 4,
        };
        let core = Core::new(
            settings,
            Now {
                at: now,
                unix_ms: f.unix_ms,
            },
            seed,
        );
        let mut plan = VecDeque::new();
        let mut t = now;
        for n in 0..commands {
            t += Duration::from_millis(u64::from(rng.next_u32() % 8_000));
            let action = match rng.next_u32() % 4 {
                0 => Act::Read,
                1 => Act::Lock,
                2 => Act::Unlock,
                _ => Act::Pull,
            };
            let ttl = Duration::from_millis(500 + u64::from(rng.next_u32() % 20_000));
            let command = Command {
                id: format!("c{n}"),
                lock: "front".into(),
                action,
                mode: Mode::Normal,
                deadline: t + ttl,
                origin: "prop".into(),
            };
            plan.push_back((
                t,
                Job {
                    command,
                    retried: false,
                },
            ));
        }
        let reboots = (0..reboots)
            .map(|_| now + Duration::from_millis(u64::from(rng.next_u32() % 60_000)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Run {
            f,
            now,
            start: now,
            core,
            lock,
            link: None,
            faults,
            streams: 0,
            rng,
            plan,
            reboots,
            sent: Vec::new(),
            outcomes: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            writes: BTreeMap::new(),
        }
    }

    fn stamp(&self) -> Now {
        Now {
            at: self.now,
            unix_ms: self.f.unix_ms + (self.now - self.start).as_millis() as u64,
        }
    }

    /// Run until the core has stopped; `false` if virtual time ran out first.
    fn run(&mut self) -> bool {
        let limit = self.start + Duration::from_secs(3_600);
        let mut stopping = false;
        while !self.core.is_stopped() {
            if self.now > limit {
                return false;
            }
            self.carry_out();
            if self.pump() {
                continue;
            }
            if !stopping && self.plan.is_empty() && self.outcomes.len() == self.deadlines.len() {
                stopping = true;
                let now = self.stamp();
                self.core.handle_stop(now);
                continue;
            }
            if self.core.wants_slot().is_some() {
                let now = self.stamp();
                self.core.handle_slot(now, SlotChange::Granted);
                continue;
            }
            self.advance();
        }
        true
    }

    /// Carry out the core's actions as the shell does.
    fn carry_out(&mut self) {
        while let Some(action) = self.core.poll_action() {
            let now = self.stamp();
            match action {
                Action::Connect { .. } => {
                    let change = self.connect();
                    self.core.handle_link(now, change);
                }
                Action::Record(_) => self.core.handle_recorded(now, Ok(())),
                Action::Send { body, command } => {
                    let record_from = self.lock.actuations().len();
                    let Some(l) = self.link.as_mut() else {
                        self.core.handle_not_sent(now, "no link".into());
                        continue;
                    };
                    match l.client.send_command(self.now, &body) {
                        Ok(()) => {
                            if let Some(c) = command {
                                *self.writes.entry(c.id.clone()).or_default() += 1;
                                if c.action.is_actuating() {
                                    self.sent.push(Sent {
                                        id: c.id,
                                        action: c.action,
                                        at: self.now,
                                        conn: l.conn,
                                        record_from,
                                    });
                                }
                            }
                        }
                        Err(e) => self.core.handle_not_sent(now, e.to_string()),
                    }
                }
                Action::SignedTime => {
                    if let Some(l) = self.link.as_mut() {
                        let datetime = now.unix_ms.to_be_bytes();
                        let sig: p256::ecdsa::Signature = self.f.authority.sign(&datetime);
                        let st = SignedTime {
                            datetime,
                            signature: sig.to_der().as_bytes().to_vec(),
                        };
                        l.client.send_signed_time(self.now, &st);
                    }
                }
                Action::Close => {
                    if let Some(mut l) = self.link.take() {
                        l.client.close(self.now);
                        while let Some(t) = l.client.poll_transmit() {
                            self.lock.write(self.now, l.conn, t.channel, &t.bytes);
                        }
                        self.lock.disconnect(l.conn);
                    }
                }
                Action::Probe => self.core.handle_probe(now, Ok(())),
                Action::Diagnose => self.core.handle_diagnosis(now, None),
                Action::Finish { command, outcome } => {
                    self.outcomes.entry(command.id).or_default().push(outcome);
                }
                Action::Park | Action::View { .. } | Action::Progress { .. } => {}
                Action::Publish(_) => {}
            }
        }
    }

    fn connect(&mut self) -> LinkChange {
        match self.lock.connect(self.now, 247) {
            Err(refusal) => LinkChange::Failed {
                reason: format!("refused: {refusal:?}"),
                pending: false,
            },
            Ok((conn, mtu)) => {
                for c in Channel::ALL {
                    self.lock.subscribe(conn, c, true);
                }
                let mut config = self.f.client_config();
                config.att_mtu = mtu;
                config.timing = ClientTiming {
                    command_timeout: COMMAND_TIMEOUT,
                    ..ClientTiming::default()
                };
                let seed = self.rng.next_u64();
                let mut client = self.f.client(config, seed, self.now);
                client.start(self.now, self.stamp().unix_ms);
                self.streams += 2;
                self.link = Some(Link {
                    conn,
                    client,
                    to_lock: FaultyPipe::new(&self.faults, self.streams),
                    to_client: FaultyPipe::new(&self.faults, self.streams + 1),
                });
                LinkChange::Up { rssi: None }
            }
        }
    }

    /// Move what is due one hop. Returns whether anything moved.
    fn pump(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        let mut cut = false;
        let mut lock_dropped = false;
        if let Some(l) = self.link.as_mut() {
            while let Some(t) = l.client.poll_transmit() {
                moved = true;
                if l.to_lock.push(now, (t.channel, t.bytes)) == Fate::Disconnect {
                    cut = true;
                }
            }
            while let Some((channel, bytes)) = l.to_lock.pop_due(now) {
                moved = true;
                self.lock.write(now, l.conn, channel, &bytes);
            }
        }
        while let Some(out) = self.lock.poll_output() {
            moved = true;
            match (out, self.link.as_mut()) {
                (
                    Output::Value {
                        conn,
                        channel,
                        bytes,
                    },
                    Some(l),
                ) if conn == l.conn => {
                    cut |= l.to_client.push(now, (channel, bytes)) == Fate::Disconnect;
                }
                (Output::Disconnect { conn, .. }, Some(l)) if conn == l.conn => {
                    lock_dropped = true;
                }
                _ => {}
            }
        }
        if let Some(l) = self.link.as_mut() {
            while let Some((channel, bytes)) = l.to_client.pop_due(now) {
                moved = true;
                l.client.handle_input(now, channel, &bytes);
            }
        }
        if cut || lock_dropped {
            if let Some(l) = self.link.take() {
                self.lock.disconnect(l.conn);
            }
            let stamp = self.stamp();
            let reason = if cut {
                "link fault"
            } else {
                "lock dropped the link"
            };
            self.core.handle_link(
                stamp,
                LinkChange::Down {
                    reason: reason.into(),
                },
            );
            return true;
        }
        let mut events = Vec::new();
        if let Some(l) = self.link.as_mut() {
            while let Some(e) = l.client.poll_event() {
                events.push(e);
            }
        }
        for e in events {
            moved = true;
            let stamp = self.stamp();
            self.core.handle_event(stamp, e);
        }
        moved
    }

    /// Move the clock to the next thing that happens and let it happen.
    fn advance(&mut self) {
        let link = self.link.as_ref();
        let next = [
            self.core.poll_timeout(),
            link.and_then(|l| l.client.poll_timeout()),
            link.and_then(|l| l.to_lock.next_due()),
            link.and_then(|l| l.to_client.next_due()),
            self.lock.poll_timeout(),
            self.plan.front().map(|(t, _)| *t),
            self.reboots.front().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else {
            // Nothing will ever happen: the checks will say what is missing.
            self.now += Duration::from_secs(3_600);
            return;
        };
        self.now = self.now.max(next);
        let now = self.now;
        while self.plan.front().is_some_and(|(t, _)| *t <= now) {
            let (_, job) = self.plan.pop_front().unwrap();
            self.deadlines
                .insert(job.command.id.clone(), job.command.deadline);
            let stamp = self.stamp();
            self.core.handle_job(stamp, job);
        }
        while self.reboots.front().is_some_and(|t| *t <= now) {
            self.reboots.pop_front();
            self.lock.reboot(now, Duration::from_millis(3_000));
        }
        if self.lock.poll_timeout().is_some_and(|t| t <= now) {
            self.lock.handle_timeout(now);
        }
        if let Some(l) = self.link.as_mut() {
            if l.client.poll_timeout().is_some_and(|t| t <= now) {
                l.client.handle_timeout(now);
            }
        }
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            let stamp = self.stamp();
            self.core.handle_timeout(stamp);
        }
    }

    /// The safety promise, from the lock's own record.
    fn check(&self) -> Result<(), String> {
        for (id, deadline) in &self.deadlines {
            match self.outcomes.get(id).map(Vec::as_slice) {
                Some([_]) => {}
                other => return Err(format!("{id}: {other:?} — not exactly one outcome")),
            }
            let writes = self.writes.get(id).copied().unwrap_or(0);
            let actuating = self.sent.iter().any(|s| &s.id == id);
            if actuating && writes > 1 {
                return Err(format!("{id}: written {writes} times"));
            }
            if let Some(s) = self.sent.iter().find(|s| &s.id == id) {
                if s.at >= *deadline {
                    return Err(format!("{id}: written at or after its deadline"));
                }
            }
        }
        let record = self.lock.actuations();
        // Each write's window: from its write to the next write.
        let mut claimed = vec![false; record.len()];
        for (n, s) in self.sent.iter().enumerate() {
            let end = self
                .sent
                .get(n + 1)
                .map_or(record.len(), |next| next.record_from);
            let mine: Vec<usize> = (s.record_from..end)
                .filter(|&i| record[i].trigger == "remote" && record[i].conn == s.conn)
                .collect();
            if mine.len() > 1 {
                return Err(format!(
                    "{}: actuated {} times: {:?}",
                    s.id,
                    mine.len(),
                    record
                ));
            }
            for &i in &mine {
                if record[i].command != op::name(s.action.opcode()).to_ascii_lowercase() {
                    return Err(format!("{}: the lock did {:?}", s.id, record[i]));
                }
                claimed[i] = true;
            }
            let success = matches!(
                self.outcomes.get(&s.id).map(Vec::as_slice),
                Some([Outcome::Success { .. }])
            );
            let took = mine.iter().any(|&i| record[i].result == "success");
            if success && !took {
                return Err(format!("{}: success, but the lock did not take it", s.id));
            }
        }
        for (i, a) in record.iter().enumerate() {
            if a.trigger == "remote" && !claimed[i] {
                return Err(format!("an actuation no command asked for: {a:?}"));
            }
        }
        Ok(())
    }
}

fn faults(seed: u64, loss: f64, duplicate: f64, reorder: f64, cut: Option<u64>) -> FaultConfig {
    FaultConfig {
        loss,
        duplicate,
        reorder,
        reorder_delay_ms: 150,
        delay_ms: 5,
        jitter_ms: 20,
        disconnect_after_frames: cut,
        seed,
        ..FaultConfig::default()
    }
}

fn run_case(seed: u64, faults: FaultConfig, commands: usize, reboots: usize) -> (Run, bool) {
    let mut run = Run::new(seed, faults, commands, reboots);
    let finished = run.run();
    (run, finished)
}

fn verdict(seed: u64, run: &Run, finished: bool) -> Result<(), String> {
    if !finished {
        return Err(format!("seed {seed}: the session never stopped"));
    }
    run.check().map_err(|e| format!("seed {seed}: {e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_safety_promise_holds_under_faults(
        seed in any::<u64>(),
        loss in 0.0f64..0.15,
        duplicate in 0.0f64..0.1,
        reorder in 0.0f64..0.1,
        cut in proptest::option::weighted(0.3, 20u64..400),
        commands in 1usize..16,
        reboots in 0usize..3,
    ) {
        let (run, finished) = run_case(seed, faults(seed, loss, duplicate, reorder, cut), commands, reboots);
        if let Err(e) = verdict(seed, &run, finished) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn a_clean_link_gives_every_command_its_true_outcome() {
    let (run, finished) = run_case(1, FaultConfig::default(), 12, 0);
    verdict(1, &run, finished).unwrap();
    // Without faults nothing is ambiguous or unreachable.
    for (id, o) in &run.outcomes {
        assert!(
            !matches!(o[0], Outcome::Ambiguous { .. }) && o[0].failure() != Some("unreachable"),
            "{id}: {o:?}"
        );
    }
    assert!(!run.lock.actuations().is_empty());
}

#[test]
fn the_seeds_that_once_failed_still_hold() {
    for &(seed, loss, duplicate, reorder, cut, commands, reboots) in REGRESSIONS {
        let f = faults(seed, loss, duplicate, reorder, cut);
        let (run, finished) = run_case(seed, f, commands, reboots);
        verdict(seed, &run, finished).unwrap();
    }
}

/// The harness really reaches the rules it checks: over fifty faulty runs, commands end in
/// every outcome a lossy link can give.
#[test]
fn the_faults_reach_every_outcome_rule() {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut actuations = 0;
    for seed in 0..50u64 {
        let (run, finished) = run_case(seed, faults(seed, 0.1, 0.05, 0.05, Some(150)), 12, 1);
        verdict(seed, &run, finished).unwrap();
        actuations += run.lock.actuations().len();
        for o in run.outcomes.values() {
            let kind = match &o[0] {
                Outcome::Failed { reason, .. } => format!("failed: {reason}"),
                o => o.status().to_string(),
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    println!("{actuations} actuations; outcomes {kinds:?}");
    for kind in ["success", "ambiguous", "expired", "failed: unreachable"] {
        assert!(kinds.contains_key(kind), "no {kind} in {kinds:?}");
    }
    assert!(actuations > 100, "{actuations}");
}
