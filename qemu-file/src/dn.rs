//! A certificate's subject as a string, written as GnuTLS writes it for QEMU's
//! authorization checks (`gnutls_x509_crt_get_dn`, GnuTLS 3.7 as Debian 12's QEMU 7.2
//! uses it), so that a `tls-authz` rule means the same to vmm as to QEMU:
//!
//! - the RDNs in the certificate's order (GnuTLS's compatible order, not RFC 4514's
//!   reversed one), joined by `,`; the values of a multi-valued RDN by `+`;
//! - GnuTLS's names for the attribute types (`CN`, `O`, `OU`, `C`, `ST`, `L`, `DC`,
//!   `UID`, `EMAIL`, `serialNumber`, `title`...), and the dotted OID for the others;
//! - a value as text when it has the string type GnuTLS expects for its attribute (any
//!   DirectoryString type for `CN`, `O`...; exactly PrintableString for `C`; IA5String
//!   for `DC` and `EMAIL`), RFC 4514's escapes applied; otherwise `#` and the hex of
//!   its DER (a `C` written as a UTF8String is `C=#0c024742`).
//!
//! `cargo xtask interop` checks this against QEMU itself: a QEMU destination whose
//! `authz-simple` holds the name written here lets vmm's source in.

use x509_parser::der_parser::asn1_rs::{Any, Tag, ToDer};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The string type GnuTLS expects for an attribute's value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// X.520 DirectoryString: any of its string types.
    Directory,
    /// Exactly a PrintableString.
    Printable,
    /// Exactly an IA5String.
    Ia5,
    /// Exactly a UTF8String.
    Utf8,
    /// Exactly a NumericString.
    Numeric,
}

/// GnuTLS's table of the attribute types it names (lib/x509/common.c).
const NAMES: &[(&str, &str, Expect)] = &[
    ("1.3.6.1.5.5.7.9.2", "placeOfBirth", Expect::Directory),
    ("1.3.6.1.5.5.7.9.3", "gender", Expect::Printable),
    (
        "1.3.6.1.5.5.7.9.4",
        "countryOfCitizenship",
        Expect::Printable,
    ),
    ("1.3.6.1.5.5.7.9.5", "countryOfResidence", Expect::Printable),
    ("2.5.4.6", "C", Expect::Printable),
    ("2.5.4.9", "street", Expect::Directory),
    ("2.5.4.12", "title", Expect::Directory),
    ("2.5.4.10", "O", Expect::Directory),
    ("2.5.4.11", "OU", Expect::Directory),
    ("2.5.4.3", "CN", Expect::Directory),
    ("2.5.4.7", "L", Expect::Directory),
    ("2.5.4.8", "ST", Expect::Directory),
    ("2.5.4.13", "description", Expect::Directory),
    ("2.5.4.5", "serialNumber", Expect::Printable),
    ("2.5.4.20", "telephoneNumber", Expect::Printable),
    ("2.5.4.4", "surName", Expect::Directory),
    ("2.5.4.43", "initials", Expect::Directory),
    ("2.5.4.44", "generationQualifier", Expect::Directory),
    ("2.5.4.42", "givenName", Expect::Directory),
    ("2.5.4.65", "pseudonym", Expect::Directory),
    ("2.5.4.46", "dnQualifier", Expect::Printable),
    ("2.5.4.17", "postalCode", Expect::Directory),
    ("2.5.4.41", "name", Expect::Directory),
    ("2.5.4.15", "businessCategory", Expect::Directory),
    ("0.9.2342.19200300.100.1.25", "DC", Expect::Ia5),
    ("0.9.2342.19200300.100.1.1", "UID", Expect::Directory),
    (
        "1.2.840.113556.1.4.656",
        "userPrincipalName",
        Expect::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.1",
        "jurisdictionOfIncorporationLocalityName",
        Expect::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.2",
        "jurisdictionOfIncorporationStateOrProvinceName",
        Expect::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.3",
        "jurisdictionOfIncorporationCountryName",
        Expect::Printable,
    ),
    ("1.2.840.113549.1.9.1", "EMAIL", Expect::Ia5),
    ("1.3.6.1.5.5.7.8.5", "XmppAddr", Expect::Utf8),
    ("1.2.643.100.1", "OGRN", Expect::Numeric),
    ("1.2.643.100.3", "SNILS", Expect::Numeric),
    ("1.2.643.100.5", "OGRNIP", Expect::Numeric),
    ("1.2.643.3.131.1.1", "INN", Expect::Numeric),
];

/// The subject of the DER certificate `der`, as GnuTLS writes it for QEMU.
///
/// # Errors
/// The certificate does not parse.
pub fn subject_name(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter() {
        let mut parts = Vec::new();
        for a in rdn.iter() {
            let oid = a.attr_type().to_id_string();
            let value = a.attr_value();
            let part = match NAMES.iter().find(|(o, _, _)| *o == oid) {
                Some((_, name, expect)) => match text(value, *expect) {
                    Some(Ok(t)) => format!("{name}={}", escape(&t)),
                    Some(Err(content_hex)) => format!("{name}=#{content_hex}"),
                    None => format!("{name}=#{}", der_hex(value)?),
                },
                None => format!("{oid}=#{}", der_hex(value)?),
            };
            parts.push(part);
        }
        rdns.push(parts.join("+"));
    }
    Ok(rdns.join(","))
}

/// A value as GnuTLS reads it for its expected type: `Some(Ok(text))`; `Some(Err(hex))`
/// for a DirectoryString it decodes but cannot print (hex of the string's content);
/// `None` when the type is not the expected one (then the whole DER goes out in hex).
fn text(value: &Any<'_>, expect: Expect) -> Option<Result<String, String>> {
    let data = value.data;
    let utf8 = || {
        std::str::from_utf8(data)
            .ok()
            .filter(|s| !s.contains('\0'))
            .map(|s| Ok(s.to_string()))
    };
    let tag = value.tag();
    match expect {
        Expect::Printable if tag == Tag::PrintableString => utf8(),
        Expect::Ia5 if tag == Tag::Ia5String => utf8(),
        Expect::Utf8 if tag == Tag::Utf8String => utf8(),
        Expect::Numeric if tag == Tag::NumericString => utf8(),
        Expect::Directory => match tag {
            Tag::PrintableString | Tag::Utf8String => utf8(),
            // Teletex of printable ASCII only is taken as text; other teletex and
            // universal strings are shown as the hex of their content.
            Tag::TeletexString if data.iter().all(|b| (0x20..0x7f).contains(b)) => utf8(),
            Tag::TeletexString | Tag::UniversalString => Some(Err(hex(data))),
            Tag::BmpString => {
                let units: Vec<u16> = data
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                    .collect();
                match String::from_utf16(&units) {
                    Ok(s) if data.len() % 2 == 0 && !s.contains('\0') => Some(Ok(s)),
                    _ => Some(Err(hex(data))),
                }
            }
            _ => None,
        },
        _ => None,
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn der_hex(value: &Any<'_>) -> Result<String, String> {
    Ok(hex(&value.to_der_vec().map_err(|e| e.to_string())?))
}

/// GnuTLS's escapes (RFC 4514's): `, + " \ < > ;` anywhere, `#` or a space first, a
/// space last, each after a `\`.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.len().saturating_sub(1);
    for (i, c) in v.char_indices() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_gnutls_does() {
        assert_eq!(escape("plain name"), "plain name");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape(" x "), "\\ x\\ ");
        assert_eq!(escape(" "), "\\ ");
        assert_eq!(escape("q\"\\<>;"), "q\\\"\\\\\\<\\>\\;");
    }
}
