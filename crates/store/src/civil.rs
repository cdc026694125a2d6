//! Civil (proleptic Gregorian) dates of epoch capture times, for listings
//! and reports (Howard Hinnant's algorithm).

/// Year, month (1-12) and day (1-31) of `days` since 1970-01-01.
pub fn from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(from_days(0), (1970, 1, 1));
        assert_eq!(from_days(59), (1970, 3, 1));
        assert_eq!(from_days(20_784), (2026, 11, 27));
        assert_eq!(from_days(-1), (1969, 12, 31));
    }
}
