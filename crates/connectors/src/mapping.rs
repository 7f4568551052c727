//! Field mapping: one declaration that turns an entity into the flat fields an external system
//! expects, and that system's flat fields back into a merge patch for the entity.
//!
//! Each mapped field names an external field, a dotted entity path, and optionally the JSON type
//! on each side (`string`, `number`, `boolean`) and a date format on each side. The same
//! declaration serves both directions, so out-then-in returns what went out.
//! Fields not declared are neither sent nor accepted; inbound ones are reported as unknown.

use std::collections::{BTreeMap, BTreeSet};

use chrono::format::{Item, StrftimeItems};
use chrono::{NaiveDate, NaiveDateTime};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// How one external field is declared in `[connectors.fields]`: a path, or a table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FieldSpec {
    /// `scheduledDate = "date"`: the same value on both sides.
    Path(String),
    /// `slot = { field = "slot", entity = "number", external = "string" }`.
    Detailed(DetailedField),
}

/// A mapped field with casts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetailedField {
    /// The dotted entity path.
    pub field: String,
    /// The JSON type the entity holds; defaults to `external`'s, or no check.
    #[serde(default)]
    pub entity: Option<ValueType>,
    /// The JSON type the external system uses; defaults to `entity`'s, or no check.
    #[serde(default)]
    pub external: Option<ValueType>,
    /// A chrono date format of the entity's string (e.g. `%Y-%m-%d`).
    #[serde(default)]
    pub entity_format: Option<String>,
    /// A chrono date format of the external string (e.g. `%d/%m/%Y`).
    #[serde(default)]
    pub external_format: Option<String>,
}

/// The JSON type of a mapped value on one side.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// A JSON string.
    String,
    /// A JSON number.
    Number,
    /// A JSON boolean.
    Boolean,
}

/// Why a mapping declaration or a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The declaration is inconsistent; `key` names the offending field.
    #[error("fields.{key}: {detail}")]
    Invalid {
        /// The external field name.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A value cannot be cast as declared.
    #[error("field {field}: {detail}")]
    Uncastable {
        /// The field (external name).
        field: String,
        /// Why.
        detail: String,
    },
    /// The id field is missing or not a usable id.
    #[error("{0}")]
    MissingId(String),
}

#[derive(Clone, Debug, PartialEq)]
struct MappedField {
    external: String,
    path: Vec<String>,
    entity_type: Option<ValueType>,
    external_type: Option<ValueType>,
    entity_format: Option<String>,
    external_format: Option<String>,
}

/// A validated mapping between an entity and an external system's flat fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    id_field: String,
    fields: Vec<MappedField>,
}

/// An inbound delta translated into an entity merge patch.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    /// The entity id carried by `id_field`.
    pub id: String,
    /// The merge patch to apply to the entity.
    pub patch: Json,
    /// The external values, keyed by external name, as received (for the shadow).
    pub external: BTreeMap<String, Json>,
    /// Fields in the body that the mapping does not declare.
    pub unknown: Vec<String>,
}

fn check_format(key: &str, format: &str) -> Result<(), MappingError> {
    if format.is_empty() || StrftimeItems::new(format).any(|item| matches!(item, Item::Error)) {
        return Err(MappingError::Invalid {
            key: key.to_string(),
            detail: format!("{format:?} is not a valid date format"),
        });
    }
    Ok(())
}

/// Checks that a pair of date formats carries a value out and back unchanged, on sample dates
/// and times: one whose external form drops what the entity's keeps (`%d/%m` against
/// `%Y-%m-%d`), or that holds no date at all, would send values the connector then refuses when
/// the system sends them back, or loses part of them.
fn check_round_trip(entity_format: &str, external_format: &str) -> Result<(), String> {
    use std::fmt::Write;
    let samples = [(2026, 12, 24, 13, 45, 56), (2027, 1, 5, 9, 7, 8)];
    for (year, month, day, hour, minute, second) in samples {
        let sample = NaiveDate::from_ymd_opt(year, month, day)
            .and_then(|date| date.and_hms_opt(hour, minute, second))
            .expect("the sample dates are valid");
        let mut entity = String::new();
        write!(entity, "{}", sample.format(entity_format)).map_err(|_| {
            format!("the date format {entity_format:?} cannot write a date and time")
        })?;
        let round_trip = reformat_date(&entity, entity_format, external_format)
            .and_then(|external| reformat_date(&external, external_format, entity_format));
        match round_trip {
            Ok(back) if back == entity => {}
            _ => {
                return Err(format!(
                    "the date formats {entity_format:?} and {external_format:?} do not carry \
                     {entity:?} out and back unchanged; each must hold the same parts of a date"
                ))
            }
        }
    }
    Ok(())
}

impl Mapping {
    /// Validates a declaration.
    ///
    /// # Errors
    /// [`MappingError::Invalid`] naming the field when a path is empty or has empty segments, two
    /// external fields map to the same or overlapping paths, the id field is also mapped, a
    /// type pair cannot be cast (number and boolean), or a date format is invalid or given alone.
    pub fn new(
        id_field: &str,
        declared: &BTreeMap<String, FieldSpec>,
    ) -> Result<Self, MappingError> {
        if id_field.is_empty() {
            return Err(MappingError::Invalid {
                key: "id_field".into(),
                detail: "must not be empty".into(),
            });
        }
        let mut fields = Vec::new();
        for (external, spec) in declared {
            let invalid = |detail: String| MappingError::Invalid {
                key: external.clone(),
                detail,
            };
            if external.is_empty() {
                return Err(invalid("an external field name must not be empty".into()));
            }
            if external == id_field {
                return Err(invalid(
                    "the id field is sent and read automatically; do not map it".into(),
                ));
            }
            let detailed = match spec {
                FieldSpec::Path(path) => DetailedField {
                    field: path.clone(),
                    entity: None,
                    external: None,
                    entity_format: None,
                    external_format: None,
                },
                FieldSpec::Detailed(detailed) => detailed.clone(),
            };
            let path: Vec<String> = detailed.field.split('.').map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(invalid(format!(
                    "{:?} is not a dotted field path",
                    detailed.field
                )));
            }
            let entity_type = detailed.entity.or(detailed.external);
            let external_type = detailed.external.or(detailed.entity);
            if let (Some(a), Some(b)) = (entity_type, external_type) {
                if a != b && a != ValueType::String && b != ValueType::String {
                    return Err(invalid(format!("cannot cast between {a:?} and {b:?}")));
                }
            }
            match (&detailed.entity_format, &detailed.external_format) {
                (Some(entity), Some(external_format)) => {
                    check_format(external, entity)?;
                    check_format(external, external_format)?;
                    check_round_trip(entity, external_format).map_err(invalid)?;
                    if entity_type.is_some_and(|t| t != ValueType::String)
                        || external_type.is_some_and(|t| t != ValueType::String)
                    {
                        return Err(invalid("date formats apply to strings only".into()));
                    }
                }
                (None, None) => {}
                _ => {
                    return Err(invalid(
                        "give both entity_format and external_format, or neither".into(),
                    ))
                }
            }
            fields.push(MappedField {
                external: external.clone(),
                path,
                entity_type,
                external_type,
                entity_format: detailed.entity_format,
                external_format: detailed.external_format,
            });
        }
        for (index, a) in fields.iter().enumerate() {
            for b in &fields[index + 1..] {
                let shorter = a.path.len().min(b.path.len());
                if a.path[..shorter] == b.path[..shorter] {
                    return Err(MappingError::Invalid {
                        key: b.external.clone(),
                        detail: format!(
                            "entity path {} overlaps {}'s {}",
                            b.path.join("."),
                            a.external,
                            a.path.join(".")
                        ),
                    });
                }
            }
        }
        Ok(Self {
            id_field: id_field.to_string(),
            fields,
        })
    }

    /// The external field that carries the entity id.
    pub fn id_field(&self) -> &str {
        &self.id_field
    }

    /// The external names of the mapped fields.
    pub fn external_fields(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|field| field.external.as_str())
    }

    /// The mapped fields of an entity, by external name; a field the entity lacks is absent.
    ///
    /// # Errors
    /// [`MappingError::Uncastable`] when an entity value does not fit its declared types.
    pub fn to_external(
        &self,
        data: &Map<String, Json>,
    ) -> Result<BTreeMap<String, Json>, MappingError> {
        let mut external = BTreeMap::new();
        for field in &self.fields {
            let Some(value) = lookup(data, &field.path) else {
                continue;
            };
            let cast = cast(
                value,
                field.entity_type,
                field.external_type,
                field.entity_format.as_deref(),
                field.external_format.as_deref(),
            )
            .map_err(|detail| MappingError::Uncastable {
                field: field.external.clone(),
                detail,
            })?;
            external.insert(field.external.clone(), cast);
        }
        Ok(external)
    }

    /// Translates an inbound flat body into the entity id and a merge patch.
    ///
    /// `null` removes the field. Undeclared fields are listed in `unknown`, not applied.
    ///
    /// # Errors
    /// [`MappingError::MissingId`] when the id field is absent or not a string or integer,
    /// [`MappingError::Uncastable`] when a value does not fit its declared types.
    pub fn to_entity(&self, body: &Map<String, Json>) -> Result<Inbound, MappingError> {
        let id = match body.get(&self.id_field) {
            Some(Json::String(id)) if !id.is_empty() => id.clone(),
            Some(Json::Number(number)) if number.is_i64() || number.is_u64() => number.to_string(),
            Some(_) => {
                return Err(MappingError::MissingId(format!(
                    "{} must be a non-empty string or an integer",
                    self.id_field
                )))
            }
            None => {
                return Err(MappingError::MissingId(format!(
                    "{} is missing",
                    self.id_field
                )))
            }
        };
        let mut patch = Map::new();
        let mut external = BTreeMap::new();
        for field in &self.fields {
            let Some(value) = body.get(&field.external) else {
                continue;
            };
            let entity_value = if value.is_null() {
                Json::Null
            } else {
                cast(
                    value,
                    field.external_type,
                    field.entity_type,
                    field.external_format.as_deref(),
                    field.entity_format.as_deref(),
                )
                .map_err(|detail| MappingError::Uncastable {
                    field: field.external.clone(),
                    detail,
                })?
            };
            insert_path(&mut patch, &field.path, entity_value);
            external.insert(field.external.clone(), value.clone());
        }
        let declared: BTreeSet<&str> = self.external_fields().collect();
        let unknown = body
            .keys()
            .filter(|key| *key != &self.id_field && !declared.contains(key.as_str()))
            .cloned()
            .collect();
        Ok(Inbound {
            id,
            patch: Json::Object(patch),
            external,
            unknown,
        })
    }
}

fn lookup<'a>(data: &'a Map<String, Json>, path: &[String]) -> Option<&'a Json> {
    let (first, rest) = path.split_first()?;
    let value = data.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    lookup(value.as_object()?, rest)
}

fn insert_path(patch: &mut Map<String, Json>, path: &[String], value: Json) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        patch.insert(first.clone(), value);
        return;
    }
    let child = patch
        .entry(first.clone())
        .or_insert_with(|| Json::Object(Map::new()));
    if let Json::Object(child) = child {
        insert_path(child, rest, value);
    }
}

fn type_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Casts `value` from the `from` side's type and format to the `to` side's.
fn cast(
    value: &Json,
    from: Option<ValueType>,
    to: Option<ValueType>,
    from_format: Option<&str>,
    to_format: Option<&str>,
) -> Result<Json, String> {
    if value.is_null() {
        return Ok(Json::Null);
    }
    let matches = |value: &Json, expected: ValueType| match expected {
        ValueType::String => value.is_string(),
        ValueType::Number => value.is_number(),
        ValueType::Boolean => value.is_boolean(),
    };
    if let Some(from) = from {
        if !matches(value, from) {
            return Err(format!("expected {from:?}, got {}", type_of(value)).to_lowercase());
        }
    }
    let value = match (from_format, to_format, value) {
        (Some(from_format), Some(to_format), Json::String(text)) => {
            Json::String(reformat_date(text, from_format, to_format)?)
        }
        _ => value.clone(),
    };
    match (from, to, &value) {
        (Some(ValueType::Number), Some(ValueType::String), Json::Number(number)) => {
            Ok(Json::String(number.to_string()))
        }
        (Some(ValueType::Boolean), Some(ValueType::String), Json::Bool(flag)) => {
            Ok(Json::String(flag.to_string()))
        }
        (Some(ValueType::String), Some(ValueType::Number), Json::String(text)) => {
            serde_json::from_str::<serde_json::Number>(text.trim())
                .map(Json::Number)
                .map_err(|_| format!("{text:?} is not a number"))
        }
        (Some(ValueType::String), Some(ValueType::Boolean), Json::String(text)) => {
            match text.as_str() {
                "true" => Ok(Json::Bool(true)),
                "false" => Ok(Json::Bool(false)),
                _ => Err(format!("{text:?} is not \"true\" or \"false\"")),
            }
        }
        _ => Ok(value),
    }
}

fn reformat_date(text: &str, from_format: &str, to_format: &str) -> Result<String, String> {
    use std::fmt::Write;
    let mut out = String::new();
    // Formatting can fail (a time specifier applied to a bare date); `write!` reports it where
    // `to_string()` would panic.
    let written = if let Ok(date_time) = NaiveDateTime::parse_from_str(text, from_format) {
        write!(out, "{}", date_time.format(to_format))
    } else {
        let date = NaiveDate::parse_from_str(text, from_format)
            .map_err(|_| format!("{text:?} does not match the date format {from_format:?}"))?;
        write!(out, "{}", date.format(to_format))
    };
    written.map_err(|_| format!("{text:?} cannot be written in the date format {to_format:?}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
