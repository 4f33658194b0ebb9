//! Address-book import: vCard 2.1, 3.0 and 4.0, and CSV, as phones and contact
//! services export them.
//!
//! No crate parses real-world vCards well, so this is a small lenient parser. It
//! unfolds continuation lines (RFC 6350 §3.2), joins vCard 2.1 quoted-printable soft
//! line breaks, reads `group.NAME;PARAM=…:value` lines (Apple and Google write
//! `item1.TEL`), decodes quoted-printable values, and takes the name from `FN` (or
//! from `N` when there is no `FN`) and the numbers from every `TEL`. Anything else is
//! skipped; a line it cannot read is reported, never fatal.
//!
//! CSV needs a header row; the name comes from a column called like `Name`,
//! `Full Name`, `Display Name` or `First Name` + `Last Name`, and the numbers from
//! every column whose header mentions a phone or mobile number (Google's
//! `Phone 1 - Value` may hold several, separated by ` ::: `).

/// A name and a phone number as written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub number: String,
}

/// What a file held: the entries, and what was skipped and why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    /// One line per thing skipped: where, and why.
    pub skipped: Vec<String>,
}

/// Reads `text` as vCard when it contains `BEGIN:VCARD`, else as CSV.
pub fn parse(text: &str) -> Parsed {
    if text.to_ascii_uppercase().contains("BEGIN:VCARD") {
        parse_vcard(text)
    } else {
        parse_csv(text)
    }
}

/// Splits `text` into logical lines: folded lines (a line starting with a space or
/// tab continues the previous one) are joined, and so are quoted-printable soft line
/// breaks (a line ending in `=` inside a quoted-printable value).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut soft_break = false;
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if soft_break {
            if let Some((_, last)) = out.last_mut() {
                last.pop(); // the '=' of the soft break
                last.push_str(line);
            }
        } else if (line.starts_with(' ') || line.starts_with('\t')) && !out.is_empty() {
            if let Some((_, last)) = out.last_mut() {
                last.push_str(&line[1..]);
            }
        } else {
            out.push((i + 1, line.to_string()));
        }
        soft_break = out.last().is_some_and(|(_, l)| {
            l.ends_with('=') && l.to_ascii_uppercase().contains("QUOTED-PRINTABLE")
        });
    }
    out
}

/// Decodes quoted-printable (`=4A=C3=B6` → bytes), leniently: a malformed escape
/// stays as written.
fn decode_quoted_printable(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Undoes vCard text escapes (`\,` `\;` `\n` `\\`).
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') | Some('N') => out.push(' '),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One content line: its property name (upper case, group removed), parameters and
/// value.
struct Property {
    name: String,
    params: Vec<String>,
    value: String,
}

fn property(line: &str) -> Option<Property> {
    // The value starts after the first ':' that is not inside a quoted parameter.
    let mut in_quotes = false;
    let colon = line.char_indices().find_map(|(i, c)| match c {
        '"' => {
            in_quotes = !in_quotes;
            None
        }
        ':' if !in_quotes => Some(i),
        _ => None,
    })?;
    let (head, value) = (&line[..colon], &line[colon + 1..]);
    let mut parts = head.split(';');
    let name = parts.next()?.trim();
    let name = name.rsplit('.').next().unwrap_or(name).to_ascii_uppercase();
    if name.is_empty() {
        return None;
    }
    Some(Property {
        name,
        params: parts.map(|p| p.trim().to_ascii_uppercase()).collect(),
        value: value.to_string(),
    })
}

impl Property {
    /// The value as text: quoted-printable decoded when marked so (2.1), escapes
    /// undone. Bytes that are not UTF-8 are read as Latin-1, as old phones wrote them.
    fn text(&self) -> String {
        let qp = self
            .params
            .iter()
            .any(|p| p == "QUOTED-PRINTABLE" || p == "ENCODING=QUOTED-PRINTABLE");
        let raw = if qp {
            decode_quoted_printable(&self.value)
        } else {
            self.value.as_bytes().to_vec()
        };
        let text = match String::from_utf8(raw) {
            Ok(s) => s,
            Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
        };
        unescape(text.trim())
    }
}

/// A vCard being read.
struct Card {
    /// Its BEGIN line.
    start: usize,
    /// `FN`.
    full: Option<String>,
    /// `N`, as "Given Family".
    structured: Option<String>,
    numbers: Vec<String>,
}

/// Reads vCards.
pub fn parse_vcard(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut card: Option<Card> = None;
    for (line_no, line) in logical_lines(text) {
        if line.trim().is_empty() {
            continue;
        }
        let Some(prop) = property(&line) else {
            parsed.skipped.push(format!(
                "line {line_no}: not a vCard property: {}",
                shorten(&line)
            ));
            continue;
        };
        match prop.name.as_str() {
            "BEGIN" if prop.value.trim().eq_ignore_ascii_case("VCARD") => {
                if let Some(open) = card.take() {
                    parsed
                        .skipped
                        .push(format!("line {}: a vCard without END:VCARD", open.start));
                }
                card = Some(Card {
                    start: line_no,
                    full: None,
                    structured: None,
                    numbers: Vec::new(),
                });
            }
            "END" if prop.value.trim().eq_ignore_ascii_case("VCARD") => {
                let Some(Card {
                    start,
                    full,
                    structured,
                    numbers,
                }) = card.take()
                else {
                    parsed
                        .skipped
                        .push(format!("line {line_no}: END:VCARD without BEGIN:VCARD"));
                    continue;
                };
                let name = full
                    .filter(|n| !n.is_empty())
                    .or(structured.filter(|n| !n.is_empty()))
                    .unwrap_or_default();
                if numbers.is_empty() {
                    let who = if name.is_empty() { "a contact" } else { &name };
                    parsed
                        .skipped
                        .push(format!("line {start}: {who} has no phone number"));
                }
                for number in numbers {
                    parsed.entries.push(Entry {
                        name: name.clone(),
                        number,
                    });
                }
            }
            "FN" => {
                if let Some(c) = card.as_mut() {
                    c.full = Some(prop.text());
                }
            }
            "N" => {
                if let Some(c) = card.as_mut() {
                    // Family;Given;Additional;Prefix;Suffix → "Given Family".
                    let text = prop.text();
                    let parts: Vec<&str> = text.split(';').map(str::trim).collect();
                    let given = parts.get(1).copied().unwrap_or("");
                    let family = parts.first().copied().unwrap_or("");
                    let name = format!("{given} {family}").trim().to_string();
                    c.structured = Some(name);
                }
            }
            "TEL" => match card.as_mut() {
                Some(c) => {
                    // vCard 4.0 may write `tel:+1-415-555-0100` as a URI.
                    let value = prop.text();
                    let value = value
                        .strip_prefix("tel:")
                        .or_else(|| value.strip_prefix("TEL:"))
                        .unwrap_or(&value)
                        .to_string();
                    if value.trim().is_empty() {
                        parsed.skipped.push(format!("line {line_no}: an empty TEL"));
                    } else {
                        c.numbers.push(value);
                    }
                }
                None => parsed
                    .skipped
                    .push(format!("line {line_no}: TEL outside a vCard")),
            },
            _ => {} // every other property is of no use here
        }
    }
    if let Some(open) = card {
        parsed
            .skipped
            .push(format!("line {}: a vCard without END:VCARD", open.start));
    }
    parsed
}

fn shorten(line: &str) -> String {
    let mut s: String = line.chars().take(40).collect();
    if line.chars().count() > 40 {
        s.push('…');
    }
    format!("{s:?}")
}

/// Reads CSV with a header row.
pub fn parse_csv(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = match reader.headers() {
        Ok(h) => h
            .iter()
            .map(|s| s.trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect(),
        Err(e) => {
            parsed.skipped.push(format!("no header row: {e}"));
            return parsed;
        }
    };
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
    let full = find(&[
        "name",
        "full name",
        "display name",
        "fullname",
        "displayname",
    ]);
    let first = find(&["first name", "given name", "firstname"]);
    let last = find(&["last name", "family name", "surname", "lastname"]);
    let phones: Vec<usize> = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            (h.contains("phone") || h.contains("mobile") || h.contains("tel"))
                && !h.contains("type")
                && !h.contains("label")
        })
        .map(|(i, _)| i)
        .collect();
    if phones.is_empty() {
        parsed.skipped.push(format!(
            "no phone column in the header row ({})",
            headers.join(", ")
        ));
        return parsed;
    }
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                parsed.skipped.push(format!("row {line}: {e}"));
                continue;
            }
        };
        let cell = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("").trim();
        let name = match cell(full) {
            "" => format!("{} {}", cell(first), cell(last)).trim().to_string(),
            n => n.to_string(),
        };
        let mut found = false;
        for &i in &phones {
            for number in cell(Some(i)).split(":::") {
                if !number.trim().is_empty() {
                    found = true;
                    parsed.entries.push(Entry {
                        name: name.clone(),
                        number: number.trim().to_string(),
                    });
                }
            }
        }
        if !found {
            let who = if name.is_empty() { "a contact" } else { &name };
            parsed
                .skipped
                .push(format!("row {line}: {who} has no phone number"));
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entries(p: &Parsed) -> Vec<(&str, &str)> {
        p.entries
            .iter()
            .map(|e| (e.name.as_str(), e.number.as_str()))
            .collect()
    }

    #[test]
    fn vcard_3_from_ios_with_groups_and_types() {
        let text = "BEGIN:VCARD\r\nVERSION:3.0\r\nN:Appleseed;John;;;\r\nFN:John Appleseed\r\n\
                    item1.TEL;type=pref:(415) 555-0101\r\nitem1.X-ABLabel:_$!<Mobile>!$_\r\n\
                    TEL;type=HOME;type=VOICE:+44 20 7946 0958\r\nEND:VCARD\r\n";
        let p = parse(text);
        assert_eq!(
            entries(&p),
            [
                ("John Appleseed", "(415) 555-0101"),
                ("John Appleseed", "+44 20 7946 0958")
            ]
        );
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    }

    #[test]
    fn vcard_2_1_from_android_with_quoted_printable_and_folding() {
        let text = "BEGIN:VCARD\nVERSION:2.1\n\
                    N;CHARSET=UTF-8;ENCODING=QUOTED-PRINTABLE:M=C3=BCller;J=C3=\n=B6rg;;;\n\
                    FN;CHARSET=UTF-8;ENCODING=QUOTED-PRINTABLE:J=C3=B6rg M=C3=BCller\n\
                    TEL;CELL:+49 30 \n 123456\nEND:VCARD\n";
        let p = parse(text);
        assert_eq!(entries(&p), [("Jörg Müller", "+49 30 123456")]);
    }

    #[test]
    fn vcard_4_with_uri_numbers_and_no_fn() {
        let text = "BEGIN:VCARD\nVERSION:4.0\nN:Doe;Jane;;;\n\
                    TEL;VALUE=uri;TYPE=\"voice,cell\":tel:+1-415-555-0102\nEND:VCARD\n";
        assert_eq!(entries(&parse(text)), [("Jane Doe", "+1-415-555-0102")]);
    }

    #[test]
    fn broken_vcards_import_what_is_valid_and_report_the_rest() {
        let text = "BEGIN:VCARD\nFN:Good\nTEL:+14155550100\nEND:VCARD\n\
                    this line is nonsense\n\
                    BEGIN:VCARD\nFN:No Number\nX-UNKNOWN;FOO=bar:baz\nEND:VCARD\n\
                    TEL:+1999\nEND:VCARD\n\
                    BEGIN:VCARD\nFN:Cut Off\nTEL:+14155550101\n";
        let p = parse(text);
        assert_eq!(entries(&p), [("Good", "+14155550100")]);
        assert_eq!(p.skipped.len(), 5, "{:#?}", p.skipped);
        assert!(p.skipped[0].contains("not a vCard property"));
        assert!(p.skipped[1].contains("No Number has no phone number"));
        assert!(p.skipped[2].contains("TEL outside a vCard"));
        assert!(p.skipped[3].contains("END:VCARD without BEGIN"));
        assert!(p.skipped[4].contains("without END:VCARD"));
    }

    #[test]
    fn google_and_outlook_csv() {
        let google = "\u{feff}Name,Given Name,Family Name,Phone 1 - Type,Phone 1 - Value,Phone 2 - Value\n\
                      Bob Smith,Bob,Smith,Mobile,(415) 555-0101 ::: +1 415 555 0109,\n\
                      Nobody,,,,,\n";
        let p = parse(google);
        assert_eq!(
            entries(&p),
            [
                ("Bob Smith", "(415) 555-0101"),
                ("Bob Smith", "+1 415 555 0109")
            ]
        );
        assert_eq!(p.skipped, ["row 3: Nobody has no phone number"]);
        let outlook = "First Name,Last Name,Mobile Phone,Home Phone\nCarol,Jones,,415 555 0102\n";
        assert_eq!(entries(&parse(outlook)), [("Carol Jones", "415 555 0102")]);
        let no_phone = parse("Name,Email\nX,x@example.org\n");
        assert!(no_phone.entries.is_empty());
        assert!(no_phone.skipped[0].contains("no phone column"));
    }

    proptest! {
        /// Garbage never panics, and every entry has a number.
        #[test]
        fn garbage_never_panics(text in "\\PC{0,400}") {
            let p = parse(&text);
            prop_assert!(p.entries.iter().all(|e| !e.number.trim().is_empty()));
        }

        /// Cards written the way phones write them come back, name and number.
        #[test]
        fn generated_cards_round_trip(
            cards in proptest::collection::vec(("[A-Za-z][A-Za-z ]{0,20}[A-Za-z]", "\\+[1-9][0-9]{6,12}"), 1..10),
            crlf in any::<bool>(),
            fold in any::<bool>(),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for (name, number) in &cards {
                let tel = if fold && number.len() > 4 {
                    format!("TEL;TYPE=CELL:{}{nl} {}", &number[..4], &number[4..])
                } else {
                    format!("TEL;TYPE=CELL:{number}")
                };
                text.push_str(&format!("BEGIN:VCARD{nl}VERSION:3.0{nl}FN:{name}{nl}{tel}{nl}END:VCARD{nl}"));
            }
            let p = parse(&text);
            let got: Vec<(String, String)> = p.entries.into_iter().map(|e| (e.name, e.number)).collect();
            let want: Vec<(String, String)> = cards.iter().map(|(n, m)| (n.trim().to_string(), m.clone())).collect();
            prop_assert_eq!(got, want);
            prop_assert!(p.skipped.is_empty());
        }
    }
}
