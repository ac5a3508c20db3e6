//! The fault injector: one task, one seeded random number generator, so a seed names the sequence of
//! actions (which fault, which key, how long), though not their exact timing against the daemon's.
//! Faults that last (a store cut, a slow portal) are undone by the same loop when their time is up.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use tokio::time::Instant;

use super::world::{StoreKind, Variant};
use super::{Soak, control};

/// No two process faults closer than this: each restart is followed by a recovery worth watching.
/// A short soak needs them close to meet every kind; a long one leaves room between restarts for what
/// only shows after a while (a backoff, a wait, a key left lost).
fn process_spacing(minutes: f64) -> Duration {
    Duration::from_secs(if minutes <= 3.0 { 15 } else { 45 })
}

/// A lasting fault, to be lifted.
enum Undo {
    BaoUp,
    MotoUp,
    PortalFast(usize),
}

pub struct Injector {
    s: Arc<Soak>,
    rng: Xoshiro256PlusPlus,
    undo: Vec<(Instant, Undo)>,
    last_process: Instant,
    bao_down: bool,
    moto_down: bool,
    /// The process faults left in this round, drawn from the end.
    process_round: Vec<usize>,
}

impl Injector {
    pub fn new(s: Arc<Soak>) -> Injector {
        let rng = Xoshiro256PlusPlus::seed_from_u64(s.seed);
        Injector {
            s,
            rng,
            undo: Vec::new(),
            last_process: Instant::now(),
            bao_down: false,
            moto_down: false,
            process_round: Vec::new(),
        }
    }

    /// Injects faults for `period`, then lifts every lasting one.
    pub async fn run(mut self, period: Duration) {
        let end = Instant::now() + period;
        let mut last_progress = Instant::now();
        while Instant::now() < end {
            let pause = self.rng.random_range(300..2000);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            self.lift_due(false).await;
            self.act().await;
            if last_progress.elapsed() >= Duration::from_secs(60) {
                last_progress = Instant::now();
                super::checks::progress(&self.s);
            }
        }
        self.lift_due(true).await;
    }

    async fn act(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..30 => self.manual_rotation().await,
            30..58 => self.portal_fault().await,
            58..70 => self.store_fault().await,
            70..82 => self.hook_fault().await,
            82..92 if self.last_process.elapsed() >= process_spacing(self.s.minutes) => {
                self.last_process = Instant::now();
                self.process_fault().await;
            }
            _ => {}
        }
    }

    fn key(&mut self) -> usize {
        self.rng.random_range(0..self.s.world.keys.len())
    }

    /// A rotation through the admin API, sometimes forced, rarely with partial destinations allowed.
    async fn manual_rotation(&mut self) {
        let i = self.key();
        let force = self.rng.random_bool(0.2);
        let partial = force && self.rng.random_bool(0.25);
        self.rotate(i, force, partial).await;
    }

    /// Asks the daemon to rotate key `i`; the answer must be one the admin API documents for the
    /// situation (202 started, 409 busy, 503 not ready or stopping; 404 for a key the config in
    /// force does not have).
    async fn rotate(&mut self, i: usize, force: bool, partial: bool) {
        let name = self.s.world.keys[i].plan.name.clone();
        let body = json!({
            "reason": "soak: manual rotation",
            "requested_by": "soak",
            "force": force,
            "allow_partial": partial,
        });
        let managed = self
            .s
            .world
            .managed(self.s.variant())
            .any(|k| k.plan.name == name);
        let path = format!("/v1/keys/{name}/rotate");
        let broken = match self.s.api_post(&path, &body).await {
            Ok((status, text)) => {
                self.s.leak_check(&format!("POST {path}"), &text);
                self.s.tally.manual(&status.to_string());
                match (status, managed) {
                    (202 | 409 | 503, true) | (404, false) => None,
                    _ => Some(format!("POST {path} answered {status}: {text}")),
                }
            }
            Err(e) => {
                self.s.tally.manual("no answer");
                Some(e)
            }
        };
        self.s
            .tally
            .check("the admin API answers rotations as documented", broken);
    }

    async fn portal_fault(&mut self) {
        let i = self.key();
        let portal = &self.s.world.keys[i].portal;
        let (kind, faults) = match self.rng.random_range(0..100) {
            0..25 => {
                let status = [500, 502, 503][self.rng.random_range(0..3)];
                let n = self.rng.random_range(1..=2);
                let f = json!({ "regenerate": { "fail_next": n, "status": status } });
                ("portal: regenerate answers 5xx", f)
            }
            25..45 => {
                let n = self.rng.random_range(1..=3);
                (
                    "portal: status answers 500",
                    json!({ "status": { "fail_next": n } }),
                )
            }
            45..65 => (
                "portal: regenerate lost in transit",
                json!({ "regenerate": { "lose_next": 1 } }),
            ),
            65..82 => {
                let ms = self.rng.random_range(1_000..7_000);
                let lasts = Duration::from_millis(self.rng.random_range(2_000..8_000));
                self.undo
                    .push((Instant::now() + lasts, Undo::PortalFast(i)));
                (
                    "portal: regenerate delayed",
                    json!({ "regenerate": { "delay_ms": ms } }),
                )
            }
            82..95 => {
                let n = self.rng.random_range(1..=3);
                (
                    "portal: rate limited (429)",
                    json!({ "rate_limit_next": n }),
                )
            }
            _ => {
                portal.rotate_out_of_band().await;
                self.s.tally.fault("portal: rotated out of band (drift)");
                return;
            }
        };
        portal.faults(faults).await;
        self.s.tally.fault(kind);
    }

    /// A store cut: half the time at random, half the time in the middle of a rotation.
    async fn store_fault(&mut self) {
        if self.rng.random_bool(0.5) {
            self.store_cut_anytime();
        } else {
            self.store_cut_mid_rotation().await;
        }
    }

    /// OpenBao or moto cut for 2 to 15 s (whichever is up).
    fn store_cut_anytime(&mut self) {
        let lasts = Duration::from_millis(self.rng.random_range(2_000..15_000));
        let bao_first = self.rng.random_bool(0.5);
        if (bao_first || self.moto_down) && !self.bao_down {
            self.cut(StoreKind::Vault, lasts);
            self.s.tally.fault("store: OpenBao cut");
        } else if !self.moto_down {
            self.cut(StoreKind::Aws, lasts);
            self.s.tally.fault("store: moto cut");
        }
    }

    /// A rotation whose regenerate answers late, and its key's remote stores (one, or all) cut while
    /// it waits: the new key arrives to destinations that are gone (degraded, or lost when none is
    /// left and the cut outlasts the store deadline).
    async fn store_cut_mid_rotation(&mut self) {
        let i = self.key();
        let remote: Vec<StoreKind> = self.s.world.keys[i]
            .plan
            .stores
            .iter()
            .copied()
            .filter(|k| match k {
                StoreKind::Vault => !self.bao_down,
                StoreKind::Aws => !self.moto_down,
                StoreKind::File => false,
            })
            .collect();
        if remote.is_empty() {
            return self.store_cut_anytime();
        }
        let portal = &self.s.world.keys[i].portal;
        portal
            .faults(json!({ "regenerate": { "delay_ms": 1500 } }))
            .await;
        self.undo
            .push((Instant::now() + Duration::from_secs(3), Undo::PortalFast(i)));
        self.rotate(i, true, false).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let lasts = Duration::from_millis(self.rng.random_range(3_000..15_000));
        let all = self.rng.random_bool(0.4);
        let first = self.rng.random_range(0..remote.len());
        for (n, kind) in remote.into_iter().enumerate() {
            if all || n == first {
                self.cut(kind, lasts);
            }
        }
        self.s.tally.fault(if all {
            "store: every remote store of a key cut mid-rotation"
        } else {
            "store: one store of a key cut mid-rotation"
        });
    }

    fn cut(&mut self, kind: StoreKind, lasts: Duration) {
        let until = Instant::now() + lasts;
        match kind {
            StoreKind::Vault => {
                self.s.world.bao.down();
                self.bao_down = true;
                self.undo.push((until, Undo::BaoUp));
            }
            StoreKind::Aws => {
                self.s.world.moto.down();
                self.moto_down = true;
                self.undo.push((until, Undo::MotoUp));
            }
            StoreKind::File => {}
        }
    }

    async fn hook_fault(&mut self) {
        let i = self.key();
        let dep = &self.s.world.keys[i].dependent;
        if self.rng.random_bool(0.6) {
            let n = self.rng.random_range(1..=3);
            dep.faults(json!({ "fail_reload_next": n })).await;
            self.s.tally.fault("hook: reload answers 503");
        } else {
            dep.faults(json!({ "ignore_reload_next": 1 })).await;
            self.s
                .tally
                .fault("hook: reload ignored (200, key not read)");
        }
    }

    /// The next process fault: the five kinds come in rounds, each round in a shuffled order, so even a
    /// short run meets every kind.
    async fn process_fault(&mut self) {
        if self.process_round.is_empty() {
            self.process_round = (0..5).collect();
            for i in (1..5).rev() {
                let j = self.rng.random_range(0..=i);
                self.process_round.swap(i, j);
            }
        }
        let kind = self.process_round.pop().unwrap_or(0);
        let down = Duration::from_millis(self.rng.random_range(0..3_000));
        match kind {
            0 => {
                self.s.tally.fault("process: SIGKILL, restart");
                control::kill_and_restart(&self.s, down).await;
            }
            1 => {
                self.s.tally.fault("process: SIGTERM, restart");
                control::stop_and_restart(&self.s, down).await;
            }
            2 => {
                self.s.tally.fault("process: SIGHUP, same config");
                control::reload(&self.s, self.s.variant()).await;
            }
            3 => {
                let next = if self.s.variant() == Variant::Base {
                    Variant::Changed
                } else {
                    Variant::Base
                };
                self.s.tally.fault("process: SIGHUP, changed config");
                control::reload(&self.s, next).await;
            }
            _ => {
                self.s.tally.fault("process: SIGHUP, invalid config");
                control::reload(&self.s, Variant::Invalid).await;
            }
        }
    }

    /// Lifts the lasting faults whose time is up (`all`: every one).
    async fn lift_due(&mut self, all: bool) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.undo)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.undo = later;
        for (_, undo) in due {
            match undo {
                Undo::BaoUp => {
                    self.s.world.bao.up();
                    self.bao_down = false;
                }
                Undo::MotoUp => {
                    self.s.world.moto.up();
                    self.moto_down = false;
                }
                Undo::PortalFast(i) => {
                    let fast = json!({ "regenerate": { "delay_ms": 0 } });
                    self.s.world.keys[i].portal.faults(fast).await;
                }
            }
        }
    }
}
