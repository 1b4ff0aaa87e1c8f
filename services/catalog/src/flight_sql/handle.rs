//! What a Flight SQL client hands back between calls, and what it sends
//! with every call: credentials and the state of the lake to read.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use medallion_lake::query::TimeTravel;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// Metadata naming a table version to read.
pub const VERSION_HEADER: &str = "medallion-version";
/// Metadata naming an instant (RFC 3339) to read the tables as of.
pub const AS_OF_HEADER: &str = "medallion-as-of";

/// A statement or prepared-statement handle. It carries the SQL rather
/// than pointing at server state: whoever presents it has it planned again
/// under their own grants, so a handle grants nothing by itself and any
/// catalog replica can answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handle {
    pub sql: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of: Option<DateTime<Utc>>,
    /// Prepared statements only: names the parameter values bound to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Handle {
    pub fn new(sql: String, at: TimeTravel, id: Option<String>) -> Self {
        let (version, as_of) = match at {
            TimeTravel::Latest => (None, None),
            TimeTravel::Version(v) => (Some(v), None),
            TimeTravel::AsOf(t) => (None, Some(t)),
        };
        Handle {
            sql,
            version,
            as_of,
            id,
        }
    }

    /// The state planned against when the handle was made, or, if that
    /// was the latest, what this call's metadata asks for.
    pub fn at(&self, metadata: &MetadataMap) -> Result<TimeTravel, Status> {
        match (self.version, self.as_of) {
            (Some(v), _) => Ok(TimeTravel::Version(v)),
            (None, Some(t)) => Ok(TimeTravel::AsOf(t)),
            (None, None) => time_travel(metadata),
        }
    }

    pub fn encode(&self) -> Result<Bytes, Status> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| Status::internal(format!("encoding a statement handle: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Status> {
        serde_json::from_slice(bytes).map_err(|e| {
            Status::invalid_argument(format!(
                "not a statement handle from this catalog ({e}); plan the statement again"
            ))
        })
    }
}

/// `medallion-version` / `medallion-as-of`, at most one of them.
pub fn time_travel(metadata: &MetadataMap) -> Result<TimeTravel, Status> {
    let text = |name: &str| -> Result<Option<String>, Status> {
        match metadata.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().to_string()))
                .map_err(|_| Status::invalid_argument(format!("{name}: not text"))),
        }
    };
    match (text(VERSION_HEADER)?, text(AS_OF_HEADER)?) {
        (Some(_), Some(_)) => Err(Status::invalid_argument(format!(
            "give either {VERSION_HEADER} or {AS_OF_HEADER}, not both"
        ))),
        (Some(v), None) => v.parse::<i64>().map(TimeTravel::Version).map_err(|_| {
            Status::invalid_argument(format!(
                "{VERSION_HEADER}: `{v}` is not a table version (a whole number)"
            ))
        }),
        (None, Some(t)) => DateTime::parse_from_rfc3339(&t)
            .map(|t| TimeTravel::AsOf(t.with_timezone(&Utc)))
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "{AS_OF_HEADER}: {e}; use RFC 3339, e.g. 2026-11-29T10:00:00Z"
                ))
            }),
        (None, None) => Ok(TimeTravel::Latest),
    }
}

pub const NO_TOKEN: &str = "no credentials: send the catalog JWT as `authorization: Bearer <jwt>`, or log in (handshake) with HTTP Basic and the JWT as password";

/// The token and, with Basic, the user name the client logged in as. A bare
/// token is accepted too, for clients that set the header verbatim.
pub fn credentials(metadata: &MetadataMap) -> Result<Option<(String, Option<String>)>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or(("", value));
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Status::unauthenticated("Basic credentials that are not base64 text"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| Status::unauthenticated("Basic credentials without `user:password`"))?;
        return Ok(Some((password.to_string(), Some(user.to_string()))));
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some((rest.trim().to_string(), None)));
    }
    Ok(Some((value.to_string(), None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn credentials_come_as_bearer_basic_or_bare() {
        let bearer = metadata(&[("authorization", "Bearer abc.def")]);
        assert_eq!(
            credentials(&bearer).unwrap(),
            Some(("abc.def".into(), None))
        );
        let basic = metadata(&[(
            "authorization",
            &format!("Basic {}", STANDARD.encode("alan:abc.def")),
        )]);
        assert_eq!(
            credentials(&basic).unwrap(),
            Some(("abc.def".into(), Some("alan".into())))
        );
        let bare = metadata(&[("authorization", "abc.def")]);
        assert_eq!(credentials(&bare).unwrap(), Some(("abc.def".into(), None)));
        assert_eq!(credentials(&MetadataMap::new()).unwrap(), None);
        let broken = metadata(&[("authorization", "Basic !!!")]);
        assert_eq!(
            credentials(&broken).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn time_travel_comes_from_one_header_and_sticks_to_the_handle() {
        assert_eq!(
            time_travel(&MetadataMap::new()).unwrap(),
            TimeTravel::Latest
        );
        let v = metadata(&[(VERSION_HEADER, "3")]);
        assert_eq!(time_travel(&v).unwrap(), TimeTravel::Version(3));
        let t = metadata(&[(AS_OF_HEADER, "2026-11-29T10:00:00Z")]);
        assert!(matches!(time_travel(&t).unwrap(), TimeTravel::AsOf(_)));
        let both = metadata(&[
            (VERSION_HEADER, "3"),
            (AS_OF_HEADER, "2026-11-29T10:00:00Z"),
        ]);
        assert!(
            time_travel(&both)
                .unwrap_err()
                .message()
                .contains("not both")
        );
        let bad = metadata(&[(VERSION_HEADER, "three")]);
        assert_eq!(
            time_travel(&bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let h = Handle::new("SELECT 1".into(), TimeTravel::Version(2), Some("id".into()));
        let back = Handle::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(back, h);
        // The handle's version wins over a later call's header.
        assert_eq!(back.at(&v).unwrap(), TimeTravel::Version(2));
        let latest = Handle::new("SELECT 1".into(), TimeTravel::Latest, None);
        assert_eq!(latest.at(&v).unwrap(), TimeTravel::Version(3));
        assert_eq!(
            Handle::decode(b"SELECT 1").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
