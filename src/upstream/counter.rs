//! The rise/fall counter behind active health checks, after rust-rpxy's
//! `counter.rs`: a pure state machine fed one check result at a time that
//! only speaks on a transition, so flapping backends cannot flood the log.

/// A backend's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

#[derive(Debug, Clone)]
pub struct Counter {
    rise: u32,
    fall: u32,
    state: Health,
    /// Consecutive results disagreeing with `state`.
    streak: u32,
    /// Up on trust, no check judged yet: one failure takes it down.
    unjudged: bool,
}

impl Counter {
    /// Backends start up: like nginx and HAProxy, traffic flows before the
    /// first check, and passive ejection covers a dead one meanwhile.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::starting(rise, fall, Health::Up)
    }

    /// Starting from a known state: a backend a previous checker found down
    /// needs `rise` passing checks before it is up again.
    pub fn starting(rise: u32, fall: u32, state: Health) -> Self {
        Counter {
            rise: rise.max(1),
            fall: fall.max(1),
            state,
            streak: 0,
            unjudged: false,
        }
    }

    /// Up on trust, not yet checked: its first check decides, a failure
    /// taking it down at once, as HAProxy's first check does (a server
    /// starts with its health at `rise`, one step from down). Waiting for
    /// `fall` failures sent every request of the first `fall` intervals to
    /// a backend that was never there, while `/readyz` said ready (ops56 M1).
    pub fn unjudged(mut self) -> Self {
        self.unjudged = true;
        self
    }

    pub fn is_unjudged(&self) -> bool {
        self.unjudged
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one check result; returns the new state on a transition.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        if std::mem::take(&mut self.unjudged) && self.state == Health::Up && !ok {
            self.streak = 0;
            self.state = Health::Down;
            return Some(Health::Down);
        }
        let agrees = matches!((self.state, ok), (Health::Up, true) | (Health::Down, false));
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match self.state {
            Health::Up => self.fall,
            Health::Down => self.rise,
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.state = match self.state {
            Health::Up => Health::Down,
            Health::Down => Health::Up,
        };
        Some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Up on trust, a backend's first check decides: one failure takes it
    /// down; a first pass leaves `fall` failures needed from then on.
    #[test]
    fn an_unjudged_backend_s_first_failure_takes_it_down() {
        let mut counter = Counter::new(2, 3).unjudged();
        assert_eq!(counter.record(false), Some(Health::Down));
        assert_eq!(counter.record(true), None);
        assert_eq!(counter.record(true), Some(Health::Up));
        let mut counter = Counter::new(2, 3).unjudged();
        assert_eq!(counter.record(true), None);
        assert_eq!(counter.record(false), None);
        assert_eq!(counter.record(false), None);
        assert_eq!(counter.record(false), Some(Health::Down));
    }

    #[test]
    fn transitions_need_rise_or_fall_consecutive_results() {
        // (rise, fall, results, transitions reported after each result)
        type Case<'a> = (u32, u32, &'a [bool], &'a [Option<Health>]);
        let cases: &[Case] = &[
            (
                2,
                3,
                &[false, false, false],
                &[None, None, Some(Health::Down)],
            ),
            (
                2,
                3,
                &[false, false, true, false, false],
                &[None, None, None, None, None],
            ),
            (
                2,
                1,
                &[false, true, true, true],
                &[Some(Health::Down), None, Some(Health::Up), None],
            ),
            // Flapping never reaches a threshold of 2: no transition at all.
            (2, 2, &[false, true, false, true, false, true], &[None; 6]),
            (1, 1, &[true, true], &[None, None]),
        ];
        for (rise, fall, results, want) in cases {
            let mut counter = Counter::new(*rise, *fall);
            let got: Vec<_> = results.iter().map(|ok| counter.record(*ok)).collect();
            assert_eq!(got, *want, "rise {rise} fall {fall} results {results:?}");
        }
    }
}
