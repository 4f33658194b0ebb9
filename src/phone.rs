//! Phone numbers: parsing what people type into a validated E.164 [`Number`].
//!
//! Parsing and validation follow libphonenumber's rules through the `phonenumber`
//! crate; nothing here is a hand-made pattern. A [`Number`] can only be built by
//! parsing, so holding one means the number is valid and normalised.

use std::fmt;
use std::str::FromStr;

use phonenumber::country;

/// A valid phone number in E.164 form (`+14155550100`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Number(String);

/// Why a string is not a usable phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    #[error("{input:?} is not a phone number: {reason}")]
    Unparseable { input: String, reason: String },
    #[error("{input:?} is not a valid phone number (libphonenumber rejects it for its country)")]
    Invalid { input: String },
    #[error("{input:?} has no country code: write it as +<country code> <number> or give a region")]
    NoCountry { input: String },
    #[error("{0:?} is not a region: use a two-letter ISO 3166 code such as US or GB")]
    BadRegion(String),
    #[error("{input:?} is not in E.164 form (+ then digits, e.g. +14155550100)")]
    NotE164 { input: String },
}

/// A two-letter region used to read national numbers (`GB` for `020 7946 0958`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(country::Id);

impl FromStr for Region {
    type Err = NumberError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .to_ascii_uppercase()
            .parse::<country::Id>()
            .map(Region)
            .map_err(|_| NumberError::BadRegion(s.to_string()))
    }
}

impl Region {
    /// The ISO 3166 code of this region, upper case.
    pub fn code(&self) -> &str {
        self.0.as_ref()
    }
}

impl Number {
    /// Parses a number as a person would type it: `+1 (415) 555-0100`,
    /// `0044 20 7946 0958`, or a national form such as `020 7946 0958` with a region.
    pub fn parse(input: &str, region: Option<Region>) -> Result<Number, NumberError> {
        let trimmed = input.trim();
        // Without a region libphonenumber cannot know the international call prefix;
        // `00` is the prefix of most of the world (ITU-T E.164 recommends it), so a
        // leading `00` is read as `+` unless a region says otherwise.
        let owned;
        let text = match (region, trimmed.strip_prefix("00")) {
            (None, Some(rest)) => {
                owned = format!("+{rest}");
                owned.as_str()
            }
            _ => trimmed,
        };
        if region.is_none() && !text.starts_with('+') {
            return Err(NumberError::NoCountry {
                input: input.to_string(),
            });
        }
        let parsed = phonenumber::parse(region.map(|r| r.0), text).map_err(|e| {
            NumberError::Unparseable {
                input: input.to_string(),
                reason: e.to_string(),
            }
        })?;
        if !parsed.is_valid() {
            return Err(NumberError::Invalid {
                input: input.to_string(),
            });
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        Ok(Number(e164))
    }

    /// Parses a number that must already be in E.164 form, as it travels on the wire.
    /// The node uses this: clients normalise, the node re-validates.
    pub fn parse_e164(input: &str) -> Result<Number, NumberError> {
        let digits = input.strip_prefix('+').unwrap_or("");
        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NumberError::NotE164 {
                input: input.to_string(),
            });
        }
        let number = Number::parse(input, None)?;
        if number.0 != input {
            return Err(NumberError::NotE164 {
                input: input.to_string(),
            });
        }
        Ok(number)
    }

    /// The number in E.164 form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The country calling code (`1` for +1 415…, `44` for +44 20…).
    pub fn calling_code(&self) -> u16 {
        phonenumber::parse(None, &self.0)
            .map(|n| n.code().value())
            .unwrap_or(0)
    }

    /// The region the number belongs to, when libphonenumber knows one.
    pub fn region(&self) -> Option<Region> {
        phonenumber::parse(None, &self.0)
            .ok()
            .and_then(|n| n.country().id())
            .map(Region)
    }

    /// The number formatted for people, in international form (`+1 415-555-0100`).
    pub fn display_international(&self) -> String {
        match phonenumber::parse(None, &self.0) {
            Ok(n) => n
                .format()
                .mode(phonenumber::Mode::International)
                .to_string(),
            Err(_) => self.0.clone(),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, region: Option<&str>, expected: Result<&str, ()>) {
        let region = region.map(|r| r.parse::<Region>().expect("test region"));
        let got = Number::parse(input, region);
        match expected {
            Ok(e164) => assert_eq!(got.as_ref().map(Number::as_str), Ok(e164), "{input}"),
            Err(()) => assert!(got.is_err(), "{input} parsed as {got:?}"),
        }
    }

    #[test]
    fn forms_people_type() {
        check("+1 (415) 555-0100", None, Ok("+14155550100"));
        check("+14155550100", None, Ok("+14155550100"));
        check("0044 20 7946 0958", None, Ok("+442079460958"));
        check("020 7946 0958", Some("GB"), Ok("+442079460958"));
        check("020 7946 0958", Some("gb"), Ok("+442079460958"));
        check("(415) 555-0101", Some("US"), Ok("+14155550101"));
        check("+44 (0)20 7946 0958", None, Ok("+442079460958"));
    }

    #[test]
    fn refused() {
        check("+1 23", None, Err(()));
        check("hello", None, Err(()));
        check("", None, Err(()));
        check("020 7946 0958", None, Err(()));
        check("+999 1234567", None, Err(()));
    }

    #[test]
    fn bad_region() {
        assert!(matches!(
            "XX".parse::<Region>(),
            Err(NumberError::BadRegion(_))
        ));
        assert!(matches!(
            "GBR".parse::<Region>(),
            Err(NumberError::BadRegion(_))
        ));
    }

    #[test]
    fn wire_form_must_be_exact_e164() {
        assert_eq!(
            Number::parse_e164("+14155550100").map(|n| n.0),
            Ok("+14155550100".to_string())
        );
        for bad in [
            "14155550100",
            "+1 415 555 0100",
            "+1(415)5550100",
            "+",
            "+123",
            "+1415555010000000",
        ] {
            assert!(Number::parse_e164(bad).is_err(), "{bad}");
        }
    }
}
