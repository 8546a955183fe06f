//! Per-render bounds on what a template may allocate and how deep its values may nest
//! (train-rs patch; see `vendor/README.md` of train-rs).
//!
//! Fuel bounds the number of instructions, but one instruction can allocate without bound
//! (`s ~ s` doubles a string, `'x' * n`, `join`, `replace`, `format` widths) and a namespace can
//! be made to hold a value nested one level deeper at every loop step, whose display, drop and
//! comparison recurse once per level until the native stack overflows.  This module keeps a
//! memory budget for the render running on the current thread (a render runs on one thread;
//! nested evaluations — macros, includes — share it): every place that creates a string or a
//! container charges its size *before* allocating it, like fuel is charged before an
//! instruction runs.  The budget counts what is created, not what is alive: it is simple,
//! cannot be gamed by freeing and re-allocating, and real templates create a few times the
//! size of their output.
//!
//! [`check_stored`] bounds nesting where a value outlives an expression (a `set` or a namespace
//! attribute): deeper values, namespaces inside namespace attributes (the only way to build
//! an unbounded chain by mutation), and lazy sequences (whose wrappers would chain) are
//! handled there.

use std::cell::Cell;
use std::fmt;

use crate::error::{Error, ErrorKind};
use crate::value::{ObjectRepr, Value, ValueKind, ValueRepr};

/// Bytes charged for one value held in a list or a map (a `Value` plus its share of the
/// container's allocation).
pub(crate) const VALUE_COST: usize = 32;

/// Deepest nesting of lists, maps and namespaces a stored value may have.  `serde_json`
/// refuses input nested deeper than 128, so data from JSON never reaches it.
pub(crate) const MAX_VALUE_DEPTH: usize = 128;

#[derive(Clone, Copy)]
struct Budget {
    limit: usize,
    used: usize,
    exceeded: bool,
}

thread_local! {
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Installs a budget of `limit` bytes for the render on this thread, unless one is already
/// installed (nested evaluations share the outer render's budget).
pub(crate) struct RenderBudget {
    installed: bool,
}

impl RenderBudget {
    pub(crate) fn enter(limit: Option<usize>) -> RenderBudget {
        let installed = match limit {
            Some(limit) => BUDGET.with(|b| {
                if b.get().is_some() {
                    false
                } else {
                    b.set(Some(Budget {
                        limit,
                        used: 0,
                        exceeded: false,
                    }));
                    true
                }
            }),
            None => false,
        };
        RenderBudget { installed }
    }

    /// Replaces the result of a render that ran out of memory by the memory error: the writer
    /// that noticed it can only report a formatting error, and an iteration, comparison or
    /// hash that noticed it can only stop early (see [`visit`]), so the render may even have
    /// "succeeded" on a truncated walk.
    pub(crate) fn finish<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        match result {
            Err(err) if err.kind() == ErrorKind::OutOfMemory => Err(err),
            _ if self.installed && exceeded() => Err(out_of_memory()),
            other => other,
        }
    }
}

impl Drop for RenderBudget {
    fn drop(&mut self) {
        if self.installed {
            BUDGET.with(|b| b.set(None));
        }
    }
}

fn exceeded() -> bool {
    BUDGET.with(|b| b.get().is_some_and(|b| b.exceeded))
}

fn out_of_memory() -> Error {
    let limit = BUDGET.with(|b| b.get().map_or(0, |b| b.limit));
    Error::new(
        ErrorKind::OutOfMemory,
        format!("the template allocated more than {} MiB", limit >> 20),
    )
}

/// Charges `bytes` to the render's budget; fails once the budget is spent.  Without a budget
/// (no memory limit, or outside a render) this does nothing.
pub(crate) fn charge(bytes: usize) -> Result<(), Error> {
    let over = BUDGET.with(|b| match b.get() {
        Some(mut budget) => {
            budget.used = budget.used.saturating_add(bytes);
            if budget.used > budget.limit {
                budget.exceeded = true;
            }
            b.set(Some(budget));
            budget.exceeded
        }
        None => false,
    });
    if over {
        Err(out_of_memory())
    } else {
        Ok(())
    }
}

/// Charges `count` values held in a container.
pub(crate) fn charge_values(count: usize) -> Result<(), Error> {
    charge(count.saturating_mul(VALUE_COST))
}

/// Charges one element yielded by an iteration over a list, a map, an iterable object or a
/// string's characters ([`VALUE_COST`] bytes, like an element created), and says whether the
/// walk may go on.  Every walk over a value's parts iterates (loops, filters, `in`, `==`,
/// ordering, hashing, display), so this bounds their time: a value whose parts are shared
/// (`{% set ns.x = [ns.x, ns.x] %}` sixty times) is small to store but exponential to walk,
/// and a large list compared in a loop would multiply its length by the fuel.  A walk told to
/// stop ends early; the render then fails with the memory error ([`RenderBudget::finish`]).
pub(crate) fn visit() -> bool {
    charge(VALUE_COST).is_ok()
}

/// An iterator whose every element is charged by [`visit`]; it ends when the budget is spent.
/// Its size hint is the inner one, so loops keep an exact `loop.length` (a render whose walk
/// was cut short fails anyway).
pub(crate) struct Charged<I>(pub(crate) I);

impl<I: Iterator> Iterator for Charged<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        if visit() {
            self.0.next()
        } else {
            None
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Charges the size of a value just created by an instruction (a string's bytes, a list's or
/// a map's entries; what a lazy sequence yields is charged when it is materialized).
pub(crate) fn charge_created(value: &Value) -> Result<(), Error> {
    match value.0 {
        ValueRepr::String(ref s, _) => charge(s.len()),
        ValueRepr::SmallStr(_) => Ok(()),
        ValueRepr::Bytes(ref b) => charge(b.len()),
        ValueRepr::Object(ref obj) if matches!(obj.repr(), ObjectRepr::Seq | ObjectRepr::Map) => {
            charge_values(obj.enumerator_len().unwrap_or(0))
        }
        _ => Ok(()),
    }
}

/// A `fmt::Write` into a string that charges every byte it appends.
pub(crate) struct ChargedString(pub(crate) String);

impl fmt::Write for ChargedString {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        charge(s.len()).map_err(|_| fmt::Error)?;
        self.0.push_str(s);
        Ok(())
    }
}

/// `value.to_string()`, charged as it grows (the display of a value whose parts are shared
/// can be exponentially larger than the value).
pub(crate) fn to_string(value: &Value) -> Result<String, Error> {
    if let Some(s) = value.as_str() {
        ok!(charge(s.len()));
        return Ok(s.to_string());
    }
    format(format_args!("{value}"))
}

/// `format!(…)`, charged as it grows.
pub(crate) fn format(args: fmt::Arguments<'_>) -> Result<String, Error> {
    let mut out = ChargedString(String::new());
    match fmt::write(&mut out, args) {
        Ok(()) => Ok(out.0),
        Err(_) if exceeded() => Err(out_of_memory()),
        Err(_) => Err(Error::new(
            ErrorKind::WriteFailure,
            "formatting a value failed",
        )),
    }
}

fn too_deep() -> Error {
    Error::new(
        ErrorKind::NestingTooDeep,
        format!(
            "a value nested deeper than {MAX_VALUE_DEPTH} levels (lists, maps and namespaces); \
             such values would crash the renderer"
        ),
    )
}

/// Makes `value` fit to be stored in a variable or a namespace attribute:
///
/// - a lazy sequence (the result of `a + b`, `x * n`, `reverse`…) is materialized into a list,
///   charged, so that wrappers of wrappers cannot chain through assignments;
/// - nesting deeper than [`MAX_VALUE_DEPTH`] is refused;
/// - with `in_namespace`, a value holding a namespace is refused: namespaces are the only
///   mutable values, and one stored inside another could grow a chain (or a cycle) that no
///   single assignment shows.
///
/// Returns the number of values visited, which the caller charges as fuel. A container held
/// several times (`[a, a]`) is looked into again only when it is reached deeper than before,
/// so a value whose parts are shared costs what it holds, not what it would display.
pub(crate) fn check_stored(value: Value, in_namespace: bool) -> Result<(Value, usize), Error> {
    let value = ok!(materialize(value));
    let mut visited = 0usize;
    let mut seen: std::collections::HashMap<*const (), usize> = std::collections::HashMap::new();
    // Iterative, so that checking does not itself recurse.
    let mut pending: Vec<(Value, usize)> = vec![(value.clone(), 0)];
    while let Some((v, depth)) = pending.pop() {
        visited += 1;
        let ValueRepr::Object(ref obj) = v.0 else {
            continue;
        };
        match seen.entry(obj.data_ptr()) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if *e.get() >= depth {
                    continue;
                }
                e.insert(depth);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(depth);
            }
        }
        let is_namespace = v.downcast_object_ref::<crate::value::namespace_object::Namespace>().is_some();
        if is_namespace && in_namespace {
            return Err(Error::new(
                ErrorKind::NestingTooDeep,
                "a namespace attribute cannot hold a namespace (namespaces inside namespaces \
                 can chain or cycle without bound)",
            ));
        }
        match obj.repr() {
            ObjectRepr::Seq | ObjectRepr::Map => {}
            // Lazy sequences inside containers come from within one expression (a stored one
            // is materialized), so their chains are bounded by the template's text.
            _ => continue,
        }
        if depth >= MAX_VALUE_DEPTH {
            return Err(too_deep());
        }
        if v.kind() == ValueKind::Map {
            if let Ok(keys) = v.try_iter() {
                for key in keys {
                    if let Some(item) = v.get_item_opt(&key) {
                        pending.push((item, depth + 1));
                    }
                }
            }
        } else if let Ok(items) = v.try_iter() {
            for item in items {
                pending.push((item, depth + 1));
            }
        }
    }
    Ok((value, visited))
}

/// Turns a lazy sequence (`ObjectRepr::Iterable`) into a list, charging its items.
fn materialize(value: Value) -> Result<Value, Error> {
    let ValueRepr::Object(ref obj) = value.0 else {
        return Ok(value);
    };
    if !matches!(obj.repr(), ObjectRepr::Iterable) {
        return Ok(value);
    }
    let Some(iter) = obj.try_iter() else {
        return Ok(value);
    };
    let mut items = Vec::new();
    for item in iter {
        ok!(charge_values(1));
        items.push(item);
    }
    Ok(Value::from(items))
}
