//! A certificate's subject as a string, written as GnuTLS writes it for QEMU's
//! authorization checks (`gnutls_x509_crt_get_dn`, RFC 4514): the RDNs last first, joined
//! by `,`, the values of a multi-valued RDN by `+`, GnuTLS's short names (`CN`, `O`, `OU`,
//! `C`, `ST`, `L`, `DC`, `UID`, `EMAIL`...), special characters escaped with `\`, and
//! an attribute GnuTLS has no name for as `OID=#` and its DER in hex.

use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// GnuTLS's short names of the attribute types it knows by name.
const NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "SN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "givenName"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// The subject of the DER certificate `der`, as GnuTLS prints it.
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
            let part = match (NAMES.iter().find(|(o, _)| *o == oid), a.as_str()) {
                (Some((_, short)), Ok(v)) => format!("{short}={}", escape(v)),
                (Some((_, short)), Err(_)) => format!("{short}=#{}", der_hex(a)?),
                (None, _) => format!("{oid}=#{}", der_hex(a)?),
            };
            parts.push(part);
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn der_hex(a: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Result<String, String> {
    let der = a.attr_value().to_der_vec().map_err(|e| e.to_string())?;
    Ok(der.iter().map(|b| format!("{b:02x}")).collect())
}

/// RFC 4514's escapes: `, + " \ < > ;` anywhere, `#` or a space first, a space last.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
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
    fn escapes_as_rfc4514_asks() {
        assert_eq!(escape("plain name"), "plain name");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape(" x "), "\\ x\\ ");
        assert_eq!(escape("q\"\\<>;"), "q\\\"\\\\\\<\\>\\;");
    }
}
