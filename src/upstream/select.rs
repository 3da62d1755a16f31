//! Backend selection, as pure functions over plain data: which backend of
//! an upstream gets the next request. Knows nothing about HTTP or health
//! checking; callers pass in who is eligible and how busy each one is.
//!
//! - Smooth weighted round-robin is nginx's algorithm: every pick adds each
//!   backend's weight to its running score, takes the highest and subtracts
//!   the total from it. Weights 5/1/1 give `a a b a c a a`, spread out
//!   rather than `a a a a a b c`. The cycle is computed once per change of
//!   the eligible set, so the request path only indexes it.
//! - Least-connections picks the fewest in-flight requests for the weight,
//!   ties taken in weighted round-robin order, as nginx does.
//! - Random-two (power of two choices) compares two distinct eligible
//!   backends drawn by weight and takes the less busy for its weight: near
//!   least-conn balance without a herd on one "least" backend.

/// One backend as the selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub eligible: bool,
    pub weight: u32,
    pub in_flight: usize,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One full smooth weighted round-robin cycle over the eligible candidates,
/// as indices into `candidates`. Weights are first divided by their greatest
/// common divisor, so 300/100 costs a cycle of 4, not 400.
pub fn weighted_cycle(candidates: &[Candidate]) -> Vec<usize> {
    let eligible: Vec<(usize, u64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.eligible && c.weight > 0)
        .map(|(i, c)| (i, u64::from(c.weight)))
        .collect();
    let divisor = eligible
        .iter()
        .fold(0u32, |g, (_, w)| gcd(g, *w as u32))
        .max(1) as u64;
    let weights: Vec<(usize, i64)> = eligible
        .iter()
        .map(|(i, w)| (*i, (*w / divisor) as i64))
        .collect();
    let total: i64 = weights.iter().map(|(_, w)| w).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, (_, weight)) in weights.iter().enumerate() {
            current[k] += weight;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        cycle.push(weights[best].0);
    }
    cycle
}

/// `a` carries less load for its weight than `b` (in flight / weight,
/// compared by cross-multiplying, no division).
fn lighter(a: &Candidate, b: &Candidate) -> bool {
    (a.in_flight as u128) * u128::from(b.weight.max(1))
        < (b.in_flight as u128) * u128::from(a.weight.max(1))
}

/// How far along the weighted cycle a tie is looked for before the plain
/// rotation decides: enough for any sane weights, bounded for odd ones.
const TIE_WALK: usize = 64;

/// The eligible candidate with the fewest requests in flight relative to
/// its weight, as nginx's `least_conn`: ties go to the first of them along
/// `cycle` (the smooth weighted round-robin order) from `start`, so tied
/// backends share requests by weight, 3:1 weights giving 3:1 at low load.
/// Takes an accessor rather than a slice so the request path need not
/// collect one.
pub fn least_conn(
    n: usize,
    cycle: &[usize],
    start: usize,
    get: impl Fn(usize) -> Candidate,
) -> Option<usize> {
    let mut best: Option<(usize, Candidate)> = None;
    for offset in 0..n {
        let i = (start + offset) % n;
        let c = get(i);
        if c.eligible && best.as_ref().is_none_or(|(_, b)| lighter(&c, b)) {
            best = Some((i, c));
        }
    }
    let (first, least) = best?;
    let tied = (0..cycle.len().min(TIE_WALK))
        .map(|k| cycle[(start + k) % cycle.len()])
        .find(|&i| {
            let c = get(i);
            c.eligible && !lighter(&least, &c)
        });
    Some(tied.unwrap_or(first))
}

/// Power of two choices, as nginx's `random two least_conn`: two distinct
/// eligible candidates drawn at random with probability by weight (`r1` and
/// `r2` are uniform random numbers), then the less loaded for its weight.
pub fn random_two(n: usize, r1: u64, r2: u64, get: impl Fn(usize) -> Candidate) -> Option<usize> {
    let weight = |i: usize| {
        let c = get(i);
        if c.eligible {
            u64::from(c.weight.max(1))
        } else {
            0
        }
    };
    // The candidate at `point` along the eligible weights, leaving out
    // `except`.
    let at = |mut point: u64, except: Option<usize>| {
        (0..n).filter(|&i| Some(i) != except).find(|&i| {
            let w = weight(i);
            if point < w {
                return true;
            }
            point -= w;
            false
        })
    };
    let total: u64 = (0..n).map(weight).sum();
    if total == 0 {
        return None;
    }
    let a = at(r1 % total, None)?;
    let rest = total - weight(a);
    if rest == 0 {
        return Some(a);
    }
    let b = at(r2 % rest, Some(a))?;
    Some(if lighter(&get(b), &get(a)) { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(weight: u32) -> Candidate {
        Candidate {
            eligible: true,
            weight,
            in_flight: 0,
        }
    }

    fn down(weight: u32) -> Candidate {
        Candidate {
            eligible: false,
            ..up(weight)
        }
    }

    fn busy(in_flight: usize) -> Candidate {
        Candidate { in_flight, ..up(1) }
    }

    #[test]
    fn weighted_cycle_is_smooth_like_nginx() {
        let cases: &[(&[Candidate], &[usize])] = &[
            // nginx's documented example: 5/1/1 -> a a b a c a a
            (&[up(5), up(1), up(1)], &[0, 0, 1, 0, 2, 0, 0]),
            (&[up(1), up(1), up(1)], &[0, 1, 2]),
            (&[up(3), up(1)], &[0, 0, 1, 0]),
            // Common factors are removed: the same cycle as 3/1.
            (&[up(300), up(100)], &[0, 0, 1, 0]),
            // Ineligible backends never appear.
            (&[up(2), down(5), up(1)], &[0, 2, 0]),
            (&[down(1), down(1)], &[]),
            (&[], &[]),
        ];
        for (candidates, want) in cases {
            assert_eq!(weighted_cycle(candidates), *want, "{candidates:?}");
        }
    }

    #[test]
    fn weighted_cycle_honours_the_ratio_exactly() {
        let cycle = weighted_cycle(&[up(7), up(2), up(3)]);
        let count = |i| cycle.iter().filter(|&&x| x == i).count();
        assert_eq!((count(0), count(1), count(2)), (7, 2, 3));
    }

    #[test]
    fn least_conn_picks_the_least_busy_and_rotates_ties() {
        let cases: &[(&[Candidate], usize, Option<usize>)] = &[
            (&[busy(3), busy(1), busy(2)], 0, Some(1)),
            (&[busy(0), busy(0), busy(0)], 0, Some(0)),
            (&[busy(0), busy(0), busy(0)], 1, Some(1)),
            (&[busy(0), busy(0), busy(0)], 5, Some(2)),
            // A down backend is skipped however idle it is.
            (&[down(1), busy(4), busy(5)], 0, Some(1)),
            (&[down(1), down(1)], 0, None),
            (&[], 0, None),
            // Weight 2 with 3 in flight is less loaded than weight 1 with 2.
            (
                &[
                    Candidate {
                        eligible: true,
                        weight: 1,
                        in_flight: 2,
                    },
                    Candidate {
                        eligible: true,
                        weight: 2,
                        in_flight: 3,
                    },
                ],
                0,
                Some(1),
            ),
        ];
        for (candidates, start, want) in cases {
            let cycle = weighted_cycle(candidates);
            let got = least_conn(candidates.len(), &cycle, *start, |i| candidates[i]);
            assert_eq!(got, *want, "{candidates:?} from {start}");
        }
    }

    #[test]
    fn least_conn_shares_ties_by_weight() {
        let candidates = [up(3), up(1)];
        let cycle = weighted_cycle(&candidates);
        let picks: Vec<usize> = (0..8)
            .filter_map(|start| least_conn(2, &cycle, start, |i| candidates[i]))
            .collect();
        let first = picks.iter().filter(|&&i| i == 0).count();
        assert_eq!((first, picks.len() - first), (6, 2), "{picks:?}");
        // A tie found nowhere along the cycle (the backend just came back,
        // say) is still decided.
        assert_eq!(least_conn(2, &[], 1, |i| candidates[i]), Some(1));
    }

    #[test]
    fn random_two_takes_the_less_busy_of_two_distinct_eligible() {
        // r1, r2 point along the eligible weights (here all 1).
        let cases: &[(&[Candidate], u64, u64, Option<usize>)] = &[
            (&[busy(5), busy(1), busy(9)], 0, 0, Some(1)),
            (&[busy(5), busy(1), busy(9)], 0, 1, Some(0)),
            // The second draw never repeats the first.
            (&[busy(5), busy(1)], 1, 0, Some(1)),
            (&[busy(5), busy(1)], 0, 0, Some(1)),
            // Down backends are not drawn.
            (&[down(1), busy(3), busy(2)], 0, 0, Some(2)),
            (&[down(1), busy(3), down(1)], 7, 9, Some(1)),
            (&[down(1)], 0, 1, None),
        ];
        for (candidates, r1, r2, want) in cases {
            let got = random_two(candidates.len(), *r1, *r2, |i| candidates[i]);
            assert_eq!(got, *want, "{candidates:?} {r1} {r2}");
        }
    }

    #[test]
    fn random_two_draws_by_weight() {
        // Idle backends weighted 5:1: the first draw decides, by weight.
        let candidates = [up(5), up(1)];
        let picks: Vec<usize> = (0..6)
            .map(|r1| random_two(2, r1, 0, |i| candidates[i]).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 0, 0, 0, 1]);
    }
}
