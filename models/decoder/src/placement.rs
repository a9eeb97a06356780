//! Where a PEFT adapter sits, and with which rank and alpha, beyond a plain list of projections.
//!
//! `adapter_config.json` may name its modules by a regular expression (`target_modules` as a
//! string), leave some out (`exclude_modules`), keep to some layers (`layers_to_transform`,
//! `layers_pattern`) and give some modules their own rank or alpha (`rank_pattern`,
//! `alpha_pattern`). PEFT decides each module by its full name in the base model
//! (`model.layers.0.self_attn.q_proj`, `thinker.model.layers…` in a full Qwen2.5-Omni model)
//! with Python's `re`; [`Placement::place`] makes the same decisions as PEFT 0.21's
//! `check_target_module_exists` and `get_pattern_key`, with the patterns compiled by Oniguruma
//! in its Python syntax (the engine `tokenizers` already links), so lookaheads and the other
//! constructs of `re` that trainers write (LLaMA-Factory's `^(?!.*visual).*(?:q_proj|…)`) mean
//! what they mean to PEFT.

use onig::{Regex, RegexOptions, Region, SearchOptions, Syntax};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Names, each matching a module of that full name or ending in `.name`, or one pattern the
/// whole name must match: how PEFT reads `target_modules` and `exclude_modules`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleMatch {
    /// A list of names (`["q_proj", "mlp.down_proj"]`).
    Names(Vec<String>),
    /// A regular expression (`"^model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj$"`).
    Pattern(String),
}

impl ModuleMatch {
    /// Whether the module named `key` matches (PEFT: `re.fullmatch` for a pattern; for
    /// names, `key` equal to one or ending in `.` + one).
    pub fn matches(&self, key: &str) -> Result<bool, String> {
        Ok(match self {
            Self::Names(names) => names_match(names, key),
            Self::Pattern(p) => pattern_matches(p, key)?,
        })
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Names(names) => json!(names),
            Self::Pattern(p) => json!(p),
        }
    }
}

/// The finer placement of an adapter read from `adapter_config.json`; all empty for adapters
/// made here and for plain PEFT adapters, which put one rank and alpha on every projection of
/// the listed kinds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// `target_modules` given as a string: a pattern each module's full name must match
    /// entirely (then `LoraConfig::target_modules` is empty).
    pub target_pattern: Option<String>,
    /// `exclude_modules`: modules left without an adapter even when targeted.
    pub exclude_modules: Option<ModuleMatch>,
    /// `layers_to_transform`: the only layer indices that get adapters (with listed targets).
    pub layers_to_transform: Option<Vec<u64>>,
    /// `layers_pattern`: the name(s) of the layer list the index follows (`layers`); empty:
    /// the first numbered segment of the name.
    pub layers_pattern: Vec<String>,
    /// `rank_pattern`, in the file's order (the first key that matches decides).
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`, in the file's order.
    pub alpha_pattern: Vec<(String, f64)>,
}

impl Placement {
    /// Whether nothing beyond the plain list is asked for.
    pub fn is_plain(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the module `key` (its full name in the base model) gets an adapter, given the
    /// listed `targets` (ignored when a target pattern is set). The error names the key
    /// whose pattern is not a regular expression.
    pub fn targets(&self, targets: &[String], key: &str) -> Result<bool, (&'static str, String)> {
        if let Some(exclude) = &self.exclude_modules {
            if exclude.matches(key).map_err(|e| ("exclude_modules", e))? {
                return Ok(false);
            }
        }
        if let Some(p) = &self.target_pattern {
            return pattern_matches(p, key).map_err(|e| ("target_modules", e));
        }
        let found = names_match(targets, key);
        let Some(layers) = self.layers_to_transform.as_ref().filter(|l| !l.is_empty()) else {
            return Ok(found);
        };
        if !found {
            return Ok(false);
        }
        Ok(self
            .layer_index(key)
            .map_err(|e| ("layers_pattern", e))?
            .is_some_and(|i| layers.contains(&i)))
    }

    /// The layer index in `key` as PEFT finds it: after one of `layers_pattern`, or the
    /// first numbered segment.
    fn layer_index(&self, key: &str) -> Result<Option<u64>, String> {
        let patterns: Vec<String> = if self.layers_pattern.is_empty() {
            vec![r".*?\.[^.]*\.(?P<idx>\d+)\.".into()]
        } else {
            self.layers_pattern
                .iter()
                .map(|p| format!(r"(?:^|.*?\.){p}\.(?P<idx>\d+)\."))
                .collect()
        };
        for pattern in patterns {
            let re = compile(&pattern)?;
            let mut region = Region::new();
            if at_start(&re, key, Some(&mut region)) {
                let mut group = None;
                re.foreach_name(|name, groups| {
                    if name == "idx" {
                        group = groups.first().copied();
                    }
                    true
                });
                return Ok(group
                    .and_then(|g| region.pos(g as usize))
                    .and_then(|(b, e)| key[b..e].parse().ok()));
            }
        }
        Ok(None)
    }

    /// The rank and alpha of the module `key`: the first `rank_pattern` / `alpha_pattern` key
    /// that matches the end of the name at a `.` boundary (PEFT's `get_pattern_key`), or the
    /// config's `r` and `alpha`.
    pub fn rank_alpha(
        &self,
        key: &str,
        r: usize,
        alpha: f64,
    ) -> Result<(usize, f64), (&'static str, String)> {
        /// The value of the first pattern key matching `key`'s end at a `.` boundary.
        fn first<T: Copy>(patterns: &[(String, T)], key: &str) -> Result<Option<T>, String> {
            for (k, value) in patterns {
                if at_start(&compile(&format!(r"(.*\.)?({k})$"))?, key, None) {
                    return Ok(Some(*value));
                }
            }
            Ok(None)
        }
        let rank = first(&self.rank_pattern, key).map_err(|e| ("rank_pattern", e))?;
        let scale = first(&self.alpha_pattern, key).map_err(|e| ("alpha_pattern", e))?;
        Ok((rank.unwrap_or(r), scale.unwrap_or(alpha)))
    }

    /// Reads the placement keys of `obj`; `ordered` holds `rank_pattern` and `alpha_pattern`
    /// in the file's order where the text was at hand (a parsed `Value` sorts its keys).
    pub(crate) fn from_json(
        obj: &Map<String, Value>,
        ordered: Option<OrderedPatterns>,
    ) -> Result<Self, (&'static str, String)> {
        let exclude_modules = match obj.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(ModuleMatch::Pattern(s.clone())),
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(ModuleMatch::Names(strings(a, "exclude_modules")?)),
            Some(v) => {
                return Err((
                    "exclude_modules",
                    format!("expected a pattern or a list of names, found {v}"),
                ))
            }
        };
        let layers_to_transform = match obj.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| {
                (
                    "layers_to_transform",
                    format!("expected a layer index, found {n}"),
                )
            })?]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64().ok_or_else(|| {
                            (
                                "layers_to_transform",
                                format!("expected layer indices, found {v}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(v) => {
                return Err((
                    "layers_to_transform",
                    format!("expected a layer index or a list of them, found {v}"),
                ))
            }
        };
        let layers_pattern = match obj.get("layers_pattern") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) if s.is_empty() => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => strings(a, "layers_pattern")?,
            Some(v) => {
                return Err((
                    "layers_pattern",
                    format!("expected a name or a list of names, found {v}"),
                ))
            }
        };
        let sorted = |key: &'static str| -> Result<Vec<(String, Value)>, (&'static str, String)> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(m)) => {
                    Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                }
                Some(v) => Err((
                    key,
                    format!("expected an object of pattern: value, found {v}"),
                )),
            }
        };
        let (ranks, alphas) = match ordered {
            Some(o) => (o.rank_pattern.0, o.alpha_pattern.0),
            None => (sorted("rank_pattern")?, sorted("alpha_pattern")?),
        };
        let rank_pattern = ranks
            .into_iter()
            .map(|(k, v)| match v.as_u64() {
                Some(r) if r >= 1 => Ok((k, usize::try_from(r).unwrap_or(usize::MAX))),
                _ => Err((
                    "rank_pattern",
                    format!("`{k}`: the rank must be a whole number of at least 1, found {v}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let alpha_pattern = alphas
            .into_iter()
            .map(|(k, v)| match v.as_f64() {
                Some(a) if a > 0.0 && a.is_finite() => Ok((k, a)),
                _ => Err((
                    "alpha_pattern",
                    format!("`{k}`: alpha must be a positive number, found {v}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let placement = Self {
            target_pattern: None,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
        };
        placement.check_patterns()?;
        Ok(placement)
    }

    /// Compiles every pattern once, so a bad one is refused when the adapter is opened.
    pub(crate) fn check_patterns(&self) -> Result<(), (&'static str, String)> {
        if let Some(p) = &self.target_pattern {
            compile(p).map_err(|e| ("target_modules", e))?;
        }
        if let Some(ModuleMatch::Pattern(p)) = &self.exclude_modules {
            compile(p).map_err(|e| ("exclude_modules", e))?;
        }
        for p in &self.layers_pattern {
            compile(p).map_err(|e| ("layers_pattern", e))?;
        }
        for (p, _) in &self.rank_pattern {
            compile(p).map_err(|e| ("rank_pattern", e))?;
        }
        for (p, _) in &self.alpha_pattern {
            compile(p).map_err(|e| ("alpha_pattern", e))?;
        }
        Ok(())
    }

    /// The placement keys as `adapter_config.json` holds them (patterns in their order).
    pub(crate) fn write_json(&self, obj: &mut Map<String, Value>) {
        let object = |pairs: Vec<(String, Value)>| Value::Object(pairs.into_iter().collect());
        obj.insert(
            "exclude_modules".into(),
            self.exclude_modules
                .as_ref()
                .map_or(Value::Null, ModuleMatch::to_json),
        );
        obj.insert(
            "layers_to_transform".into(),
            self.layers_to_transform
                .as_ref()
                .map_or(Value::Null, |l| json!(l)),
        );
        obj.insert(
            "layers_pattern".into(),
            match self.layers_pattern.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        obj.insert(
            "rank_pattern".into(),
            object(
                self.rank_pattern
                    .iter()
                    .map(|(k, r)| (k.clone(), json!(r)))
                    .collect(),
            ),
        );
        obj.insert(
            "alpha_pattern".into(),
            object(
                self.alpha_pattern
                    .iter()
                    // A whole alpha as PEFT writes it (an int in Python).
                    .map(|(k, a)| match a.fract() == 0.0 && a.abs() < 2f64.powi(53) {
                        true => (k.clone(), json!(*a as i64)),
                        false => (k.clone(), json!(a)),
                    })
                    .collect(),
            ),
        );
    }
}

fn strings(items: &[Value], key: &'static str) -> Result<Vec<String>, (&'static str, String)> {
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| (key, format!("expected names, found {v}")))
        })
        .collect()
}

/// PEFT's list match: `key` is one of `names` or ends in `.` + one.
fn names_match(names: &[String], key: &str) -> bool {
    names.iter().any(|n| {
        key == n
            || key
                .strip_suffix(n.as_str())
                .is_some_and(|r| r.ends_with('.'))
    })
}

/// Python's `re.fullmatch(pattern, key)`.
fn pattern_matches(pattern: &str, key: &str) -> Result<bool, String> {
    Ok(at_start(&compile(&format!("(?:{pattern})\\Z"))?, key, None))
}

/// `pattern` compiled with Python's `re` syntax.
fn compile(pattern: &str) -> Result<Regex, String> {
    Regex::with_options(pattern, RegexOptions::REGEX_OPTION_NONE, Syntax::python())
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

/// Python's `re.match`: a match that starts at the start of `s` (the pattern's own anchors
/// decide where it ends).
fn at_start(re: &Regex, s: &str, region: Option<&mut Region>) -> bool {
    re.match_with_options(s, 0, SearchOptions::SEARCH_OPTION_NONE, region)
        .is_some()
}

/// A JSON object's entries in the order of the text.
#[derive(Debug, Default)]
pub(crate) struct InOrder(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for InOrder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<InOrder, E> {
                Ok(InOrder::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InOrder, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(InOrder(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `rank_pattern` and `alpha_pattern` read from the text in their order.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OrderedPatterns {
    #[serde(default)]
    rank_pattern: InOrder,
    #[serde(default)]
    alpha_pattern: InOrder,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_match_whole_dotted_suffixes_and_patterns_the_whole_name() {
        let m = ModuleMatch::Names(names(&["q_proj", "mlp.down_proj"]));
        assert!(m.matches("model.layers.0.self_attn.q_proj").unwrap());
        assert!(m.matches("model.layers.3.mlp.down_proj").unwrap());
        assert!(!m.matches("model.layers.0.self_attn.xq_proj").unwrap());
        assert!(!m.matches("model.layers.0.self_attn.q_proj.base").unwrap());
        // LLaMA-Factory's pattern for multimodal models: a lookahead Rust's `regex` lacks.
        let p = ModuleMatch::Pattern(r"^(?!.*(?:audio_tower|visual)).*(?:q_proj|v_proj)".into());
        assert!(p.matches("model.layers.0.self_attn.q_proj").unwrap());
        assert!(!p.matches("audio_tower.layers.0.self_attn.q_proj").unwrap());
        // fullmatch: a prefix match is not enough, whatever the alternation order.
        let p = ModuleMatch::Pattern(r"model\.layers\.1|model\.layers\.1\.mlp\.up_proj".into());
        assert!(p.matches("model.layers.1.mlp.up_proj").unwrap());
        assert!(!p.matches("model.layers.1.mlp.up_proj_x").unwrap());
        assert!(ModuleMatch::Pattern("(".into()).matches("a").is_err());
    }

    #[test]
    fn layers_follow_the_first_numbered_segment_or_the_named_list() {
        let mut p = Placement {
            layers_to_transform: Some(vec![1]),
            ..Placement::default()
        };
        let t = names(&["q_proj"]);
        assert!(p.targets(&t, "model.layers.1.self_attn.q_proj").unwrap());
        assert!(!p.targets(&t, "model.layers.0.self_attn.q_proj").unwrap());
        assert!(!p.targets(&t, "model.layers.1.self_attn.k_proj").unwrap());
        p.layers_pattern = vec!["blocks".into()];
        assert!(!p.targets(&t, "model.layers.1.self_attn.q_proj").unwrap());
        assert!(p.targets(&t, "visual.blocks.1.attn.q_proj").unwrap());
        p.exclude_modules = Some(ModuleMatch::Pattern(r"visual\..*".into()));
        assert!(!p.targets(&t, "visual.blocks.1.attn.q_proj").unwrap());
    }

    #[test]
    fn the_first_matching_pattern_key_gives_rank_and_alpha() {
        let p = Placement {
            rank_pattern: vec![
                ("layers.1.self_attn.q_proj".into(), 2),
                ("q_proj".into(), 6),
            ],
            alpha_pattern: vec![(r"mlp\.\w+_proj".into(), 3.0)],
            ..Placement::default()
        };
        assert_eq!(
            p.rank_alpha("model.layers.1.self_attn.q_proj", 4, 8.0)
                .unwrap(),
            (2, 8.0)
        );
        assert_eq!(
            p.rank_alpha("model.layers.0.self_attn.q_proj", 4, 8.0)
                .unwrap(),
            (6, 8.0)
        );
        assert_eq!(
            p.rank_alpha("model.layers.0.mlp.up_proj", 4, 8.0).unwrap(),
            (4, 3.0)
        );
        // A key must end at a `.` boundary: `proj` does not match `q_proj`.
        let p = Placement {
            rank_pattern: vec![("proj".into(), 2)],
            ..Placement::default()
        };
        assert_eq!(
            p.rank_alpha("model.layers.0.self_attn.q_proj", 4, 8.0)
                .unwrap()
                .0,
            4
        );
    }

    #[test]
    fn patterns_keep_the_order_of_the_text() {
        let text = r#"{"rank_pattern": {"z": 1, "a": 2}, "alpha_pattern": null}"#;
        let o: OrderedPatterns = serde_json::from_str(text).unwrap();
        assert_eq!(o.rank_pattern.0[0].0, "z");
        assert!(o.alpha_pattern.0.is_empty());
    }
}
