//! Scoring and ranking proposals against a rubric. Pure functions.
//!
//! * A proposal's score is the weighted mean of what its checks contribute (a passed check its
//!   own score, 1 when it gives none; a failed check 0) and, when the rubric weighs it, the
//!   agent's self-score. Checks that did not run, and checks the rubric gives no weight, do not
//!   count. No counting check at all scores 0. Scores are rounded to [`SCORE_DECIMALS`]
//!   decimal places, so scores that are equal but for floating-point noise (0.4 + 0.3 * 0.5 +
//!   0.3 against 0.4 + 0.3 + 0.3 * 0.5) are equal, and tie.
//! * Ranking: proposals whose policy check failed come after every other one; then by score,
//!   highest first; ties break by member id (ascending), so the order never depends on the
//!   order proposals arrived in.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::{Checks, Proposal, Rubric};

/// A proposal with its score and rank.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankedProposal {
    #[serde(flatten)]
    pub proposal: Proposal,
    /// 0..1.
    pub score: f64,
    pub all_passed: bool,
    pub policy_failed: bool,
    /// 1 = best.
    pub rank: u32,
}

/// Decimal places a score keeps.
pub const SCORE_DECIMALS: i32 = 9;

/// The score of one proposal's checks (and self-score) under `rubric`, 0..1.
pub fn score(checks: &Checks, self_score: Option<f64>, rubric: &Rubric) -> f64 {
    // (weight, value) of everything that counts.
    let mut parts: Vec<(f64, f64)> = checks
        .iter()
        .map(|(name, check)| (rubric.weight(name), check.value()))
        .filter(|(w, _)| *w > 0.0)
        .collect();
    let sw = rubric.self_score_weight;
    if sw.is_finite()
        && sw > 0.0
        && let Some(s) = self_score.filter(|s| s.is_finite())
    {
        parts.push((sw, s.clamp(0.0, 1.0)));
    }
    // A weighted mean is the same under weights scaled alike: relative to the largest one, the
    // sums stay finite however large the weights are (two of f64::MAX overflowed to inf / inf).
    let largest = parts.iter().fold(0.0, |m: f64, (w, _)| m.max(*w));
    if largest <= 0.0 {
        return 0.0;
    }
    let (sum, total) = parts.iter().fold((0.0, 0.0), |(sum, total), (w, v)| {
        (sum + w / largest * v, total + w / largest)
    });
    let scale = 10f64.powi(SCORE_DECIMALS);
    ((sum / total).clamp(0.0, 1.0) * scale).round() / scale
}

fn order(a: &RankedProposal, b: &RankedProposal) -> Ordering {
    a.policy_failed
        .cmp(&b.policy_failed)
        .then_with(|| b.score.total_cmp(&a.score))
        .then_with(|| a.proposal.member.cmp(&b.proposal.member))
        .then_with(|| b.proposal.round.cmp(&a.proposal.round))
}

/// Scores and ranks `proposals` (best first, ranks from 1).
pub fn rank(proposals: Vec<Proposal>, rubric: &Rubric) -> Vec<RankedProposal> {
    let mut ranked: Vec<RankedProposal> = proposals
        .into_iter()
        .map(|p| RankedProposal {
            score: score(&p.checks, p.self_score, rubric),
            all_passed: p.checks.all_passed(),
            policy_failed: p.checks.policy_failed(),
            rank: 0,
            proposal: p,
        })
        .collect();
    ranked.sort_by(order);
    for (i, r) in ranked.iter_mut().enumerate() {
        r.rank = i as u32 + 1;
    }
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliberation::Check;
    use proptest::prelude::*;

    fn proposal(member: &str, policy: Option<bool>, lint: f64, dry: bool) -> Proposal {
        Proposal {
            member: member.into(),
            round: 1,
            content: format!("by {member}"),
            checks: Checks {
                policy: policy.map(|p| {
                    if p {
                        Check::pass(1.0, "")
                    } else {
                        Check::fail("forbidden")
                    }
                }),
                lint: Some(Check::pass(lint, "")),
                dry_run: Some(if dry {
                    Check::pass(1.0, "")
                } else {
                    Check::fail("does not build")
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_default_rubric_weighs_policy_lint_and_dry_run() {
        let p = proposal("a", Some(true), 0.5, false);
        let s = score(&p.checks, None, &Rubric::default());
        assert!((s - (0.4 + 0.3 * 0.5)).abs() < 1e-9, "{s}");
        let none = score(&Checks::default(), None, &Rubric::default());
        assert_eq!(none, 0.0);
    }

    #[test]
    fn extra_checks_and_self_scores_count_when_weighted() {
        let mut p = proposal("a", Some(true), 1.0, true);
        p.checks
            .extra
            .insert("security".into(), Check::pass(0.0, "weak"));
        let mut rubric = Rubric::default();
        rubric.weights.insert("policy".into(), 1.0);
        rubric.weights.insert("security".into(), 1.0);
        assert!((score(&p.checks, None, &rubric) - 0.5).abs() < 1e-9);
        rubric.self_score_weight = 2.0;
        let s = score(&p.checks, Some(1.0), &rubric);
        assert!((s - 0.75).abs() < 1e-9, "{s}");
    }

    #[test]
    fn scores_equal_but_for_rounding_noise_tie_and_break_by_member() {
        // 0.4 + 0.3 * 0.5 + 0.3 and 0.4 + 0.3 + 0.3 * 0.5 are both 0.85, though their floating
        // point sums differ in the last bit.
        let mut half_dry = proposal("DEV-1", Some(true), 1.0, true);
        half_dry.checks.dry_run = Some(Check::pass(0.5, ""));
        let half_lint = proposal("DEV-2", Some(true), 0.5, true);
        let ranked = rank(vec![half_lint, half_dry], &Rubric::default());
        let order: Vec<&str> = ranked.iter().map(|r| r.proposal.member.as_str()).collect();
        assert_eq!(order, ["DEV-1", "DEV-2"], "{ranked:?}");
        assert_eq!(ranked[0].score, 0.85);
        assert_eq!(ranked[1].score, 0.85);
    }

    #[test]
    fn huge_weights_still_give_a_score_between_0_and_1() {
        let p = proposal("a", Some(true), 0.5, true);
        let mut rubric = Rubric::default();
        rubric.weights.insert("policy".into(), f64::MAX);
        rubric.weights.insert("lint".into(), f64::MAX);
        assert_eq!(score(&p.checks, None, &rubric), 0.75);
        let mut rubric = Rubric::default();
        rubric.weights.insert("lint".into(), 1.0);
        rubric.self_score_weight = f64::MAX;
        assert_eq!(score(&p.checks, Some(1.0), &rubric), 1.0);
        // So the ranked proposals serialize (a NaN score is JSON null, which does not decode).
        let ranked = rank(vec![p], &rubric);
        let json = serde_json::to_string(&ranked).unwrap();
        let back: Vec<RankedProposal> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ranked);
    }

    #[test]
    fn failed_policy_ranks_last_and_ties_break_by_member() {
        let ranked = rank(
            vec![
                proposal("c", Some(false), 1.0, true),
                proposal("b", Some(true), 0.5, true),
                proposal("a", Some(true), 0.5, true),
                proposal("d", None, 1.0, true),
            ],
            &Rubric::default(),
        );
        let order: Vec<&str> = ranked.iter().map(|r| r.proposal.member.as_str()).collect();
        assert_eq!(order, ["d", "a", "b", "c"]);
        assert_eq!(
            ranked.iter().map(|r| r.rank).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(ranked[3].policy_failed && !ranked[3].all_passed);
    }

    fn arb_check() -> impl Strategy<Value = Option<Check>> {
        proptest::option::of(
            (any::<bool>(), proptest::option::of(-1.0f64..2.0)).prop_map(|(passed, score)| Check {
                passed,
                score,
                message: String::new(),
            }),
        )
    }

    fn arb_proposal() -> impl Strategy<Value = Proposal> {
        (
            "[a-e]{1,2}",
            1u32..4,
            arb_check(),
            arb_check(),
            arb_check(),
            proptest::option::of(-1.0f64..2.0),
        )
            .prop_map(
                |(member, round, policy, lint, dry_run, self_score)| Proposal {
                    member,
                    round,
                    checks: Checks {
                        policy,
                        lint,
                        dry_run,
                        ..Default::default()
                    },
                    self_score,
                    ..Default::default()
                },
            )
    }

    fn arb_rubric() -> impl Strategy<Value = Rubric> {
        (
            prop::collection::btree_map("policy|lint|dry_run|x", 0.0f64..3.0, 0..4),
            0.0f64..2.0,
        )
            .prop_map(|(weights, self_score_weight)| Rubric {
                description: String::new(),
                weights,
                self_score_weight,
            })
    }

    proptest! {
        #[test]
        fn ranking_is_a_deterministic_permutation(
            proposals in prop::collection::vec(arb_proposal(), 0..8),
            rubric in arb_rubric(),
            seed in any::<u64>(),
        ) {
            // A member answers a round once.
            let mut seen = std::collections::BTreeSet::new();
            let proposals: Vec<Proposal> = proposals
                .into_iter()
                .filter(|p| seen.insert((p.member.clone(), p.round)))
                .collect();
            let ranked = rank(proposals.clone(), &rubric);
            prop_assert_eq!(ranked.len(), proposals.len());
            for (i, r) in ranked.iter().enumerate() {
                prop_assert_eq!(r.rank as usize, i + 1);
                prop_assert!((0.0..=1.0).contains(&r.score));
            }
            // Any arrival order ranks the same.
            let mut shuffled = proposals.clone();
            let n = shuffled.len();
            if n > 1 {
                for i in 0..n {
                    let j = (seed.wrapping_mul(i as u64 + 7) % n as u64) as usize;
                    shuffled.swap(i, j);
                }
            }
            let again = rank(shuffled, &rubric);
            prop_assert_eq!(again, ranked.clone());
            // Failed policies come after every other proposal; scores descend within each part.
            let first_failed = ranked.iter().position(|r| r.policy_failed).unwrap_or(n);
            prop_assert!(ranked[first_failed..].iter().all(|r| r.policy_failed));
            for part in [&ranked[..first_failed], &ranked[first_failed..]] {
                for w in part.windows(2) {
                    prop_assert!(w[0].score >= w[1].score);
                }
            }
        }
    }
}
