//! The one factory for pluggable stages (the data transforms here, the logits processors in
//! `train-logits`): a map from a TOML table's `type` to a builder, with the built-in types
//! registered by [`Registry::new`] like any other, so that built-in and custom types are built
//! from the same `[[table]]` arrays, listed and refused the same way.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

/// A kind of pluggable stage.
pub trait Plugin: Sized + 'static {
    /// What a builder builds (a trait object such as `dyn Transform`).
    type Output: ?Sized;
    /// What a builder gets besides its options (`()` when nothing).
    type Context<'a>;
    /// The name of the TOML array of tables (`transform` for `[[transform]]`).
    const TABLE: &'static str;
    /// Registers the built-in types (called by [`Registry::new`]).
    fn builtins(registry: &mut Registry<Self>);
}

/// Builds one stage from its options; an `Err` is a message that the registry reports with the
/// table's position and type.
pub type Builder<P> = Box<
    dyn Fn(&Options, &<P as Plugin>::Context<'_>) -> Result<Box<<P as Plugin>::Output>, String>
        + Send
        + Sync,
>;

/// The options of one table: every key but `type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    type_name: String,
    table: toml::Table,
}

impl Options {
    /// Deserializes the options into your own type (`#[derive(Deserialize)]`); the error is the
    /// deserializer's message (unknown or missing keys, wrong types).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        toml::Value::Table(self.table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())
    }

    /// Deserializes the whole table, `type` included, into an enum tagged by `type` (how the
    /// built-in stages read their configuration).
    pub fn parse_tagged<T: DeserializeOwned>(&self) -> Result<T, String> {
        let mut table = self.table.clone();
        table.insert("type".into(), toml::Value::String(self.type_name.clone()));
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())
    }

    /// The table's `type`.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// True when the table has no key but `type`.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// What went wrong building a document: `field` names the table (`transform[2] (suffix)`, or
/// `transform[1].type`); `None` when the document itself is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    /// The table, when one is at fault.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for RegistryError {}

/// The factory of one kind of stage: `type` names → builders.
pub struct Registry<P: Plugin> {
    builders: BTreeMap<String, Builder<P>>,
    /// Names in registration order (built-ins first); aliases are buildable but not listed.
    listed: Vec<String>,
}

impl<P: Plugin> std::fmt::Debug for Registry<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("table", &P::TABLE)
            .field("types", &self.listed)
            .finish()
    }
}

impl<P: Plugin> Default for Registry<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Plugin> Registry<P> {
    /// A registry with the built-in types.
    pub fn new() -> Self {
        let mut r = Self {
            builders: BTreeMap::new(),
            listed: Vec::new(),
        };
        P::builtins(&mut r);
        r
    }

    /// Registers a stage under `type_name`. Refused when the name is taken (a built-in one, an
    /// alias, or one registered before).
    pub fn register(&mut self, type_name: &str, builder: Builder<P>) -> Result<(), RegistryError> {
        self.insert(type_name, builder)?;
        self.listed.push(type_name.to_string());
        Ok(())
    }

    /// Registers another name for a type (buildable, not listed by
    /// [`Registry::type_names`]).
    pub fn register_alias(
        &mut self,
        type_name: &str,
        builder: Builder<P>,
    ) -> Result<(), RegistryError> {
        self.insert(type_name, builder)
    }

    fn insert(&mut self, type_name: &str, builder: Builder<P>) -> Result<(), RegistryError> {
        if self.builders.contains_key(type_name) {
            return Err(RegistryError {
                field: Some(format!("{}.type", P::TABLE)),
                message: format!("{type_name:?} is already a {} type", P::TABLE),
            });
        }
        self.builders.insert(type_name.to_string(), builder);
        Ok(())
    }

    /// Every `type` this registry lists, built-ins first.
    pub fn type_names(&self) -> Vec<&str> {
        self.listed.iter().map(String::as_str).collect()
    }

    /// Builds the `[[TABLE]]` tables of a TOML document, in order. Errors name the table
    /// (`transform[2] (suffix)`) or its `type`.
    pub fn build_toml(
        &self,
        text: &str,
        ctx: &P::Context<'_>,
    ) -> Result<Vec<Box<P::Output>>, RegistryError> {
        let table_name = P::TABLE;
        let doc_error = |message: String| RegistryError {
            field: None,
            message,
        };
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| doc_error(e.to_string().trim_end().to_string()))?;
        let tables = match doc.remove(table_name) {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a,
            Some(_) => {
                return Err(doc_error(format!(
                    "`{table_name}` must be an array of tables ([[{table_name}]])"
                )));
            }
        };
        if let Some(key) = doc.keys().next() {
            return Err(doc_error(format!(
                "unknown key `{key}` (expected only [[{table_name}]] tables)"
            )));
        }
        let mut out = Vec::with_capacity(tables.len());
        for (i, value) in tables.into_iter().enumerate() {
            let at = format!("{table_name}[{i}]");
            let toml::Value::Table(mut table) = value else {
                return Err(RegistryError {
                    field: Some(at),
                    message: "expected a table".into(),
                });
            };
            let Some(toml::Value::String(type_name)) = table.remove("type") else {
                return Err(RegistryError {
                    field: Some(at),
                    message: "missing string key `type`".into(),
                });
            };
            let Some(builder) = self.builders.get(&type_name) else {
                return Err(RegistryError {
                    field: Some(format!("{at}.type")),
                    message: format!(
                        "unknown {table_name} {type_name:?}; known: {}",
                        self.type_names().join(", ")
                    ),
                });
            };
            let options = Options {
                type_name: type_name.clone(),
                table,
            };
            out.push(builder(&options, ctx).map_err(|message| RegistryError {
                field: Some(format!("{at} ({type_name})")),
                message,
            })?);
        }
        Ok(out)
    }
}
