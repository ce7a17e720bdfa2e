//! Retention in restic's `forget` terms: which archives a policy keeps, and by which rule.
//!
//! Archives are taken newest first. `last N` keeps the N newest. `hourly`, `daily`, `weekly`
//! (ISO weeks), `monthly` and `yearly N` each keep the newest archive of each of the N most
//! recent periods that hold one: walking from the newest, an archive is kept when its period
//! differs from the one the rule kept last, until the rule has kept N. `within D` keeps every
//! archive no older than D before the newest archive. An archive may be kept by several rules;
//! each rule that keeps it is reported. Times are UTC.

/// A retention policy. `None` means the rule is not set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    /// Seconds.
    pub within: Option<u64>,
}

/// Parses a duration like restic's `--keep-within`: `1y2m3w4d5h` (a year is 365 days, a month
/// 30 days, a week 7 days).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("an empty duration; write it like 14d, 2w or 1y6m".into());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'y' => 365 * 86400,
            'm' => 30 * 86400,
            'w' => 7 * 86400,
            'd' => 86400,
            'h' => 3600,
            other => {
                return Err(format!(
                    "duration `{t}` has an unknown unit `{other}`; use y, m, w, d or h (like 14d)"
                ))
            }
        };
        if num.is_empty() {
            return Err(format!(
                "duration `{t}` has a unit without a number before it"
            ));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration `{t}` has a number that is too large"))?;
        total = total
            .checked_add(n.checked_mul(unit).ok_or("duration is too large")?)
            .ok_or("duration is too large")?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!(
            "duration `{t}` ends in a number without a unit; write it like 14d"
        ));
    }
    Ok(total)
}

fn parse_count(key: &str, value: &str) -> Result<u32, String> {
    value.trim().parse::<u32>().map_err(|_| {
        format!(
            "`{key}` must be a count of 0 or more, got `{}`",
            value.trim()
        )
    })
}

impl Policy {
    /// Parses `last=7,daily=7,weekly=4,within=14d` (`keep-` prefixes allowed).
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut p = Policy::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("retention item `{item}` is not `rule=value`"))?;
            let key = k.trim().trim_start_matches("keep-");
            match key {
                "last" => p.last = Some(parse_count(key, v)?),
                "hourly" => p.hourly = Some(parse_count(key, v)?),
                "daily" => p.daily = Some(parse_count(key, v)?),
                "weekly" => p.weekly = Some(parse_count(key, v)?),
                "monthly" => p.monthly = Some(parse_count(key, v)?),
                "yearly" => p.yearly = Some(parse_count(key, v)?),
                "within" => p.within = Some(parse_duration(v)?),
                other => {
                    return Err(format!(
                        "unknown retention rule `{other}`; the rules are last, hourly, daily, \
                         weekly, monthly, yearly and within"
                    ))
                }
            }
        }
        Ok(p)
    }

    /// Whether no rule keeps anything.
    pub fn keeps_nothing(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .all(|c| c.unwrap_or(0) == 0)
            && self.within.is_none()
    }

    /// For archives at `times` (unix seconds, newest first), the rules that keep each one
    /// (empty: removed).
    pub fn apply(&self, times: &[i64]) -> Vec<Vec<&'static str>> {
        type Bucket = fn(i64, usize) -> i64;
        let rules: [(&'static str, Option<u32>, Bucket); 6] = [
            ("last", self.last, |_, i| i as i64),
            ("hourly", self.hourly, |t, _| t.div_euclid(3600)),
            ("daily", self.daily, |t, _| t.div_euclid(86400)),
            ("weekly", self.weekly, |t, _| iso_week(t)),
            ("monthly", self.monthly, |t, _| {
                let (y, m, _) = civil(t.div_euclid(86400));
                y * 12 + m
            }),
            ("yearly", self.yearly, |t, _| civil(t.div_euclid(86400)).0),
        ];
        let mut left: Vec<u32> = rules.iter().map(|r| r.1.unwrap_or(0)).collect();
        let mut last: Vec<Option<i64>> = vec![None; rules.len()];
        let newest = times.first().copied();
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut why = Vec::new();
                for (r, (name, _, bucket)) in rules.iter().enumerate() {
                    if left[r] == 0 {
                        continue;
                    }
                    let b = bucket(t, i);
                    if last[r] != Some(b) {
                        last[r] = Some(b);
                        left[r] -= 1;
                        why.push(*name);
                    }
                }
                if let (Some(d), Some(n)) = (self.within, newest) {
                    if t >= n.saturating_sub(d as i64) {
                        why.push("within");
                    }
                }
                why
            })
            .collect()
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ISO week of a time, as `year * 100 + week`.
fn iso_week(t: i64) -> i64 {
    let days = t.div_euclid(86400);
    // 1970-01-01 was a Thursday: Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    year * 100 + week
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    Some(days * 86400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> i64 {
        parse_time(s).unwrap()
    }

    #[test]
    fn calendar() {
        assert_eq!(t("1970-01-01T00:00:00Z"), 0);
        assert_eq!(t("2026-11-21T16:20:05Z"), 1_795_278_005);
        assert_eq!(civil(t("2024-02-29T12:00:00Z") / 86400), (2024, 2, 29));
        // ISO weeks: 2021-01-03 (Sunday) is in 2020-W53; 2021-01-04 starts 2021-W01.
        assert_eq!(iso_week(t("2021-01-03T12:00:00Z")), 202053);
        assert_eq!(iso_week(t("2021-01-04T00:00:00Z")), 202101);
        assert_eq!(iso_week(t("2026-12-31T00:00:00Z")), 202653);
    }

    #[test]
    fn parses_policies_and_refuses_nonsense() {
        let p = Policy::parse("last=7,daily=7,weekly=4,keep-within=14d").unwrap();
        assert_eq!(p.last, Some(7));
        assert_eq!(p.within, Some(14 * 86400));
        assert!(Policy::parse("").unwrap().keeps_nothing());
        assert!(Policy::parse("daily=-1").is_err());
        assert!(Policy::parse("fortnightly=2").is_err());
        assert!(Policy::parse("within=3q").is_err());
        assert!(Policy::parse("within=14").is_err());
        assert_eq!(parse_duration("1w2d3h").unwrap(), 9 * 86400 + 3 * 3600);
    }

    /// restic's own documented example: daily snapshots, `--keep-daily 3 --keep-weekly 2`.
    #[test]
    fn keeps_what_restic_keeps() {
        let times: Vec<i64> = (0..20)
            .map(|d| t("2026-03-31T10:00:00Z") - d * 86400)
            .collect();
        let p = Policy::parse("daily=3,weekly=2").unwrap();
        let kept: Vec<(usize, Vec<&str>)> = p
            .apply(&times)
            .into_iter()
            .enumerate()
            .filter(|(_, w)| !w.is_empty())
            .collect();
        // 2026-03-31 is a Tuesday: daily keeps 31, 30, 29; weekly keeps the newest of this
        // week (the 31st) and of the week before (Sunday the 29th).
        assert_eq!(
            kept,
            vec![
                (0, vec!["daily", "weekly"]),
                (1, vec!["daily"]),
                (2, vec!["daily", "weekly"]),
            ]
        );
        // last=2 plus hourly on two archives in one hour: the hour is kept once.
        let times = [
            t("2026-01-01T10:50:00Z"),
            t("2026-01-01T10:10:00Z"),
            t("2026-01-01T09:10:00Z"),
        ];
        let p = Policy::parse("hourly=5").unwrap();
        assert_eq!(
            p.apply(&times),
            vec![vec!["hourly"], vec![], vec!["hourly"]]
        );
        let p = Policy::parse("within=1h").unwrap();
        assert_eq!(
            p.apply(&times),
            vec![vec!["within"], vec!["within"], vec![]]
        );
    }
}
