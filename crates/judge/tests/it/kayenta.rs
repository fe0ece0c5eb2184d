//! Kayenta's fixed-window judge: the Mann–Whitney numbers against R and by hand, the metric
//! classification rules, and the weighted score with its overrides.

use std::collections::BTreeMap;

use coalmine_judge::kayenta::{
    classify_metric, classify_score, judge, mann_whitney, score, Classification, Direction,
    EffectSize, EffectSizeMeasure, MetricConfig, MetricResult, MetricSeries, NanStrategy,
    OutlierStrategy, ScoreClassification, ScoreThresholds,
};

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

#[test]
fn mann_whitney_on_a_tiny_sample_by_hand() {
    // Canary 3, 5, 8 against baseline 1, 2, 4, 6.
    // U: 3 beats {1, 2}, 5 beats {1, 2, 4}, 8 beats all four: U = 2 + 3 + 4 = 9.
    // Differences x − y sorted: −3 −1 −1 1 1 2 2 3 4 4 6 7; twelve of them, so the
    // Hodges–Lehmann estimate is the mean of the 6th and 7th: (2 + 2)/2 = 2.
    // Normal approximation: z = (9 − 3·4/2 − ½)/√(3·4/12·(3 + 4 + 1)) = 2.5/√8 = 0.8839,
    // p = 2·(1 − Φ(0.8839)) = 0.376759 (R 4.2.2: wilcox.test(x, y, exact = FALSE,
    // conf.int = TRUE, conf.level = 0.98) gives W = 9, p = 0.376759117811582, estimate 2).
    // Seven observations cannot exclude anything at 98 %: the interval is R's whole range
    // [min x − max y, max x − min y] = [−3, 7].
    let r = mann_whitney(&[3.0, 5.0, 8.0], &[1.0, 2.0, 4.0, 6.0], 0.98).unwrap();
    assert_eq!(r.u, 9.0);
    assert_eq!(r.estimate, 2.0);
    assert!(
        close(r.p_value, 0.376_759_117_811_582, 1e-12),
        "{}",
        r.p_value
    );
    assert_eq!((r.lower, r.upper), (-3.0, 7.0));
}

#[test]
fn mann_whitney_with_ties_matches_r() {
    // R 4.2.2, wilcox.test(x, y, exact = FALSE, correct = TRUE, conf.int = TRUE,
    // conf.level = 0.98): W = 86, p = 0.00717509893625457, interval (0.300003, 4.599925) — R's
    // uniroot stops within 1e-4 of the jumps, which sit at the pairwise differences 0.3 and 4.6.
    // R's "difference in location" is 2.390586, a point of the statistic's zero set
    // [2.3, 2.4] (the 50th and 51st of the 100 sorted differences); the Hodges–Lehmann median of
    // the differences, reported here, is (2.3 + 2.4)/2 = 2.35.
    let x = [12.1, 14.3, 15.0, 15.0, 16.2, 18.9, 13.3, 17.7, 14.8, 16.6];
    let y = [11.0, 12.5, 13.1, 13.1, 12.2, 14.0, 11.9, 12.8, 13.6, 15.0];
    let r = mann_whitney(&x, &y, 0.98).unwrap();
    assert_eq!(r.u, 86.0);
    assert!(
        close(r.p_value, 0.007_175_098_936_254_57, 1e-12),
        "{}",
        r.p_value
    );
    assert!(close(r.estimate, 2.35, 1e-12), "{}", r.estimate);
    assert!(close(r.lower, 0.3, 1e-9), "{}", r.lower);
    assert!(close(r.upper, 4.6, 1e-9), "{}", r.upper);

    // A latency-like series with one outlier: R gives W = 92, p = 0.25384236012704, interval
    // (−1.0000377, 3.0000301), estimate 1.000049 (HL median 1).
    let x = [
        101.0, 99.0, 103.0, 98.0, 100.0, 102.0, 97.0, 104.0, 100.0, 101.0, 99.0, 250.0,
    ];
    let y = [
        100.0, 98.0, 101.0, 99.0, 100.0, 97.0, 102.0, 100.0, 99.0, 101.0, 98.0, 100.0,
    ];
    let r = mann_whitney(&x, &y, 0.98).unwrap();
    assert_eq!(r.u, 92.0);
    assert!(
        close(r.p_value, 0.253_842_360_127_04, 1e-12),
        "{}",
        r.p_value
    );
    assert_eq!(r.estimate, 1.0);
    assert!(
        close(r.lower, -1.0, 1e-9) && close(r.upper, 3.0, 1e-9),
        "{r:?}"
    );
}

fn metric(name: &str, group: &str) -> MetricConfig {
    MetricConfig {
        name: name.into(),
        groups: vec![group.into()],
        ..MetricConfig::default()
    }
}

const BASE: [f64; 10] = [11.0, 12.5, 13.1, 13.1, 12.2, 14.0, 11.9, 12.8, 13.6, 15.0];

fn shifted(d: f64) -> Vec<f64> {
    BASE.iter().map(|v| v + d).collect()
}

#[test]
fn a_clear_increase_is_high_and_a_clear_decrease_low() {
    let config = metric("latency", "latency");
    let high = classify_metric(&config, &shifted(5.0), &BASE);
    assert_eq!(high.classification, Classification::High);
    assert_eq!(
        high.reason.as_deref(),
        Some("latency was classified as High")
    );
    let mw = high.mann_whitney.unwrap();
    assert!(close(mw.estimate, 5.0, 1e-9));
    assert!(mw.lower > 0.25 * 5.0);
    // mean ratio (12.92 + 5)/12.92
    assert!(close(high.deviation.unwrap(), 17.92 / 12.92, 1e-12));
    assert!(!high.critical);

    let low = classify_metric(&config, &shifted(-5.0), &BASE);
    assert_eq!(low.classification, Classification::Low);

    // Direction: only increases fail.
    let increase_only = MetricConfig {
        direction: Direction::Increase,
        ..config.clone()
    };
    assert_eq!(
        classify_metric(&increase_only, &shifted(-5.0), &BASE).classification,
        Classification::Pass
    );

    // allowedIncrease 1.5: a 39 % increase of the mean is tolerated.
    let tolerant = MetricConfig {
        effect_size: EffectSize {
            allowed_increase: Some(1.5),
            ..EffectSize::default()
        },
        ..config.clone()
    };
    assert_eq!(
        classify_metric(&tolerant, &shifted(5.0), &BASE).classification,
        Classification::Pass
    );

    // Kayenta's 25 % tolerance: the second R sample above has interval [0.3, 4.6] around 2.35,
    // and 0.3 < 0.25·2.35, so it passes although the p-value is 0.007.
    let x = [12.1, 14.3, 15.0, 15.0, 16.2, 18.9, 13.3, 17.7, 14.8, 16.6];
    assert_eq!(
        classify_metric(&config, &x, &BASE).classification,
        Classification::Pass
    );

    // CLES as the effect measure: all 100 pairs favour the canary, A = 1.
    let cles = MetricConfig {
        effect_size: EffectSize {
            measure: EffectSizeMeasure::Cles,
            allowed_increase: Some(0.9),
            ..EffectSize::default()
        },
        ..config
    };
    let r = classify_metric(&cles, &shifted(5.0), &BASE);
    assert_eq!(r.effect_size, Some(1.0));
    assert_eq!(r.classification, Classification::High);
}

#[test]
fn critical_metrics_and_missing_data() {
    let critical = MetricConfig {
        critical: true,
        ..metric("errors", "errors")
    };
    let r = classify_metric(&critical, &shifted(5.0), &BASE);
    assert_eq!(r.classification, Classification::High);
    assert!(r.critical);
    assert_eq!(
        r.reason.as_deref(),
        Some("The metric errors was classified as High (Critical)")
    );
    // Beyond allowedIncrease but below criticalIncrease: High, not critical.
    let mild = MetricConfig {
        effect_size: EffectSize {
            allowed_increase: Some(1.1),
            critical_increase: Some(5.0),
            ..EffectSize::default()
        },
        ..critical.clone()
    };
    let r = classify_metric(&mild, &shifted(5.0), &BASE);
    assert_eq!(
        (r.classification, r.critical),
        (Classification::High, false)
    );

    // No canary data: Nodata (critical if the metric is), NodataFailMetric if data is required,
    // Pass under nanStrategy "replace".
    let r = classify_metric(&metric("m", "g"), &[f64::NAN], &BASE);
    assert_eq!(
        (r.classification, r.critical),
        (Classification::Nodata, false)
    );
    let r = classify_metric(&critical, &[], &BASE);
    assert_eq!(
        (r.classification, r.critical),
        (Classification::Nodata, true)
    );
    let required = MetricConfig {
        must_have_data: true,
        ..metric("m", "g")
    };
    assert_eq!(
        classify_metric(&required, &[], &BASE).classification,
        Classification::NodataFailMetric
    );
    let replace = MetricConfig {
        nan_strategy: NanStrategy::Replace,
        ..metric("m", "g")
    };
    assert_eq!(
        classify_metric(&replace, &[], &BASE).classification,
        Classification::Pass
    );

    // Identical data passes; two constant series differ by their shift exactly.
    let r = classify_metric(&metric("m", "g"), &[3.0, 1.0, 2.0], &[1.0, 2.0, 3.0]);
    assert_eq!(r.classification, Classification::Pass);
    assert_eq!(
        r.reason.as_deref(),
        Some("The Canary and Baseline data are identical")
    );
    let r = classify_metric(&metric("m", "g"), &[5.0, 5.0, 5.0], &[3.0, 3.0]);
    let mw = r.mann_whitney.unwrap();
    assert_eq!((mw.estimate, mw.lower, mw.upper), (2.0, 2.0, 2.0));
    assert_eq!(r.classification, Classification::High);
}

#[test]
fn outliers_are_removed_with_kayentas_iqr_fences() {
    // Baseline 1..=200 plus 10000 (n = 201); commons-math percentiles (position p(n+1)/100,
    // interpolated): Q1 = 50.5, Q3 = 151.5, IQR = 101, Tukey fences with factor 3:
    // [−252.5, 454.5]; p1 = 2.02, p99 = 199.98. Reduced sensitivity keeps
    // [min(p1, −252.5), max(p99, 454.5)] = [−252.5, 454.5]: 10000 goes.
    let config = MetricConfig {
        outliers: OutlierStrategy::Remove,
        ..metric("m", "g")
    };
    let mut y: Vec<f64> = (1..=200).map(f64::from).collect();
    y.push(10_000.0);
    let r = classify_metric(&config, &y, &y);
    assert_eq!(r.control.count, 200);
    assert_eq!(r.control.max, 200.0);
    assert_eq!(r.control.median, 100.5);
    // With n = 21 the p99 position 21.78 is past the end, so the upper fence is the maximum
    // itself and nothing is removed: Kayenta's "reduced sensitivity" on short series.
    let mut short: Vec<f64> = (1..=20).map(f64::from).collect();
    short.push(10_000.0);
    assert_eq!(classify_metric(&config, &short, &short).control.count, 21);
}

fn result(name: &str, groups: &[&str], classification: Classification) -> MetricResult {
    MetricResult {
        name: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        muted: false,
        classification,
        reason: Some(format!("{name} was classified as {classification}")),
        critical: false,
        deviation: Some(1.0),
        effect_size: None,
        mann_whitney: None,
        experiment: Default::default(),
        control: Default::default(),
    }
}

#[test]
fn weighted_group_scores() {
    use Classification::*;
    let results = [
        result("5xx", &["errors"], Pass),
        result("timeouts", &["errors"], High),
        result("p50", &["latency"], Pass),
        result("p99", &["latency"], Nodata),
    ];
    // errors: 1 of 2 pass = 50; latency: 1 of 1 counted (Nodata is not) = 100.
    // errors weighs 60, latency gets the rest, 40: 0.6·50 + 0.4·100 = 70.
    let weights = BTreeMap::from([("errors".to_string(), 60.0)]);
    let s = score(&results, &weights);
    assert_eq!(s.score, 70.0);
    assert_eq!(s.reason, None);
    assert_eq!(s.groups[0].name, "errors");
    assert_eq!((s.groups[0].score, s.groups[1].score), (50.0, 100.0));
    assert_eq!(
        classify_score(s.score, 90.0, 75.0),
        ScoreClassification::Fail
    );
    assert_eq!(
        classify_score(s.score, 90.0, 70.0),
        ScoreClassification::Marginal
    );
    assert_eq!(classify_score(90.0, 90.0, 75.0), ScoreClassification::Pass);

    // Three unweighted groups share 100 equally: (100 + 100 + 0)/3 = 66.666… → 66.67. A group
    // whose only metric has no data counts as 100; NodataFailMetric counts as a failure.
    let results = [
        result("a", &["g1"], Pass),
        result("b", &["g2"], Nodata),
        result("c", &["g3"], NodataFailMetric),
        result("d", &["g1"], Pass),
    ];
    let s = score(&results, &BTreeMap::new());
    assert_eq!(s.score, 66.67);
    assert!(s.groups[1].no_data);

    // A muted failing metric does not count.
    let mut muted = result("e", &["g3"], High);
    muted.muted = true;
    let results = [result("a", &["g"], Pass), muted];
    assert_eq!(score(&results, &BTreeMap::new()).score, 100.0);
}

#[test]
fn critical_failures_and_missing_data_force_the_score_to_zero() {
    use Classification::*;
    let mut critical = result("errors", &["g"], High);
    critical.critical = true;
    critical.reason = Some("The metric errors was classified as High (Critical)".into());
    let s = score(&[result("a", &["g"], Pass), critical], &BTreeMap::new());
    assert_eq!(s.score, 0.0);
    assert_eq!(
        s.reason.as_deref(),
        Some("Canary Failed: The metric errors was classified as High (Critical)")
    );

    // Half of the metrics without data: 0, whatever the others say.
    let s = score(
        &[
            result("a", &["g"], Pass),
            result("b", &["g"], Nodata),
            result("c", &["h"], Pass),
            result("d", &["h"], Nodata),
        ],
        &BTreeMap::new(),
    );
    assert_eq!(s.score, 0.0);
    assert_eq!(
        s.reason.as_deref(),
        Some("Canary Failed: 50% or more metrics returned NODATA")
    );
}

#[test]
fn a_whole_judgement() {
    let latency = metric("latency", "latency");
    let errors = MetricConfig {
        critical: true,
        ..metric("errors", "errors")
    };
    let slow = shifted(5.0);
    let j = judge(
        &[
            MetricSeries {
                config: &latency,
                experiment: &slow,
                control: &BASE,
            },
            MetricSeries {
                config: &errors,
                experiment: &BASE,
                control: &BASE,
            },
        ],
        &BTreeMap::new(),
        ScoreThresholds::default(),
    );
    // latency High (group score 0, weight 50), errors Pass (100, weight 50): 50 → Fail.
    assert_eq!(j.score.score, 50.0);
    assert_eq!(j.classification, ScoreClassification::Fail);
    let json = serde_json::to_value(&j).unwrap();
    assert_eq!(json["metrics"][0]["classification"], "High");
    assert_eq!(json["classification"], "Fail");
    let config: MetricConfig = serde_json::from_value(serde_json::json!({
        "name": "cpu", "groups": ["system"], "direction": "increase",
        "effectSize": {"measure": "cles", "allowedIncrease": 0.8}
    }))
    .unwrap();
    assert_eq!(config.direction, Direction::Increase);
    assert_eq!(config.effect_size.measure, EffectSizeMeasure::Cles);
    assert_eq!(config.outlier_factor, 3.0);
}
