//! Hostile chat templates (the adversarial campaign's findings): every render is bounded inside
//! the engine, so each attack ends in a `DataError::Template` that names the template, within
//! seconds, instead of a stack-overflow abort or exhausted memory; a failure of the template
//! itself stops a preparation at once.

use std::path::Path;
use std::time::{Duration, Instant};

use train_data::is_template_failure;
use train_data::{
    ChatTemplate, ChatTokenizer, DataError, DatasetConfig, ErrorPolicy, LoadOptions, Message, Role,
    prepare,
};

const ORIGIN: &str = "hostile/chat_template.jinja";

/// Renders `source` on a thread of its own (2 MiB of stack, like the rayon workers that render
/// during a preparation) and returns the error, failing if it takes more than 60 s.
fn render_error(source: &str) -> DataError {
    let source = source.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let result = ChatTemplate::new(&source, ORIGIN).and_then(|t| {
                t.render(
                    &[
                        Message::new(Role::User, "Hi"),
                        Message::new(Role::Assistant, "Hello"),
                    ],
                    false,
                )
            });
            let _ = tx.send(result);
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(out)) => panic!("rendered {} bytes instead of failing", out.len()),
        Ok(Err(e)) => e,
        Err(e) => panic!("no answer within 60 s: {e}"),
    }
}

/// The error of `source` names the template, contains `expected`, and is a failure of the
/// template itself.
fn assert_fails(source: &str, expected: &str) {
    let e = render_error(source);
    let text = e.to_string();
    assert!(
        matches!(e, DataError::Template { ref template, .. } if template == ORIGIN),
        "{text}"
    );
    let shown: String = source.chars().take(300).collect();
    assert!(
        text.contains(expected),
        "expected `{expected}` in: {text}\n(template: {shown})"
    );
    assert!(is_template_failure(&e), "not a template failure: {text}");
}

const DEEP: &str = "nested too deeply";
const MEMORY: &str = "the chat template allocated more than 256 MiB";

#[test]
fn r_namespace_nesting_through_aliases_is_refused_by_the_engine() {
    for source in [
        // The alias of the namespace.
        "{% set ns = namespace(x=[]) %}{% set a = ns %}{% for i in range(100000) %}{% set a.x = [a.x] %}{% endfor %}{{ ns.x }}",
        // The attribute through a variable.
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set y = ns.x %}{% set ns.x = [y] %}{% endfor %}{{ ns.x }}",
        // Whitespace control.
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{%- set ns.x = [ns.x] -%}{% endfor %}{{ ns.x }}",
        // Maps, and a filter that nests.
        "{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = {'k': ns.x} %}{% endfor %}{{ ns.x }}",
        "{% set ns = namespace(x=[1]) %}{% for i in range(100000) %}{% set ns.x = ns.x | batch(1) | list %}{% endfor %}{{ ns.x }}",
        // Two namespaces taking turns.
        "{% set a = namespace(x=1) %}{% set b = namespace(y=1) %}{% for i in range(100000) %}{% set a.x = b.y %}{% set b.y = [a.x] %}{% endfor %}{{ b.y }}",
    ] {
        assert_fails(source, DEEP);
    }
}

#[test]
fn r_namespace_chains_and_cycles_are_refused() {
    // A chain of namespaces built through a cursor: no single assignment is deep.
    assert_fails(
        "{% set head = namespace(next=none) %}{% set st = namespace(cur=head) %}{% for i in range(100000) %}{% set n = namespace(next=none) %}{% set c = st.cur %}{% set c.next = n %}{% set st.cur = n %}{% endfor %}{{ head }}",
        "cannot hold a namespace",
    );
    // A namespace holding itself.
    assert_fails(
        "{% set ns = namespace(x=1) %}{% set ns.x = [ns] %}{{ ns }}",
        "cannot hold a namespace",
    );
}

#[test]
fn r_top_level_nesting_is_refused() {
    let mut source = String::from("{% set x = [] %}");
    for _ in 0..5000 {
        source.push_str("{% set x = [x] %}");
    }
    source.push_str("{{ x }}");
    assert_fails(&source, DEEP);
}

#[test]
fn r_long_expression_chains_are_syntax_errors_not_crashes() {
    for source in [
        format!("{{{{ 'a'{} }}}}", " ~ 'a'".repeat(100_000)),
        format!("{{{{ 'a'{} }}}}", " | string".repeat(100_000)),
        format!("{{{{ {}true }}}}", "not ".repeat(100_000)),
        format!("{{{{ messages{} }}}}", "[0]".repeat(100_000)),
    ] {
        let e = ChatTemplate::new(&source, ORIGIN).unwrap_err().to_string();
        assert!(e.contains(ORIGIN) && e.contains("recursion"), "{e}");
    }
}

#[test]
fn r_lazy_sequences_are_materialized_when_stored() {
    // `reverse` of a list is a lazy view; one of a view of a view… would chain.
    let t = ChatTemplate::new(
        "{% set ns = namespace(x=[1, 2]) %}{% for i in range(100000) %}{% set ns.x = ns.x | reverse %}{% endfor %}{{ ns.x | list }}",
        ORIGIN,
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "[1, 2]");
}

#[test]
fn r_string_growth_is_bounded() {
    assert_fails(
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        MEMORY,
    );
    assert_fails(
        &format!(
            "{{% set s = 'x' %}}{}{{{{ s | length }}}}",
            "{% set s = s ~ s %}".repeat(40)
        ),
        MEMORY,
    );
    assert_fails(
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
        MEMORY,
    );
}

#[test]
fn r_accumulation_is_bounded() {
    assert_fails(
        "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 1000000] %}{% endfor %}{{ ns.l | length }}",
        MEMORY,
    );
    // A list doubled at every step: concatenating walks both lists and storing checks the
    // result item by item (fuel); the walk's charge per element spends the memory budget
    // first (2^23 elements walked, at 32 bytes each).
    assert_fails(
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}",
        MEMORY,
    );
    // Captured output.
    assert_fails(
        "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set c %}{{ 'x' * 1000000 }}{% endset %}{% set ns.s = ns.s ~ c %}{% endfor %}",
        MEMORY,
    );
}

#[test]
fn r_huge_values_in_one_step_are_bounded() {
    for source in [
        "{{ 'x' * 10**12 }}",
        "{% set s = 'x' * 100000000 %}{% set t = s ~ s ~ s %}",
        "{{ raise_exception('x' * 10**12) }}",
        "{{ (['x' * 1000000] * 1000) | join('') }}",
        "{{ ['a', 'b'] | join('x' * 100000000) | length }}{{ ['a', 'b', 'c'] | join('x' * 100000000) | length }}",
        "{{ ('x' * 100000) | replace('', 'y' * 10000) }}",
        "{{ ('x' * 100000).replace('x', 'y' * 100000) }}",
        "{{ ('y' * 1000000).join(['a'] * 10000) }}",
        "{{ '%999999999s' | format('x') }}",
        "{{ '{:>999999999}'.format('x') }}",
        "{{ '%.999999999f' | format(1.5) }}",
        "{{ ('x\n' * 100000) | indent(100000) }}",
        "{{ [1] | batch(10**10, 0) | list }}",
        "{{ [1] | slice(10**10) }}",
        "{{ ([0] * 10**12) | list | length }}",
    ] {
        assert_fails(source, MEMORY);
    }
}

#[test]
fn r_shared_structure_cannot_blow_up_when_displayed() {
    // 2^60 leaves in 60 lists: every display is charged as it grows.
    let dag = "{% set ns = namespace(x='xxxxxxxx') %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}";
    assert_fails(&format!("{dag}{{{{ ns.x ~ '' }}}}"), MEMORY);
    assert_fails(&format!("{dag}{{{{ ns.x | string }}}}"), MEMORY);
    assert_fails(&format!("{dag}{{{{ ns.x | join(',') }}}}"), MEMORY);
    assert_fails(&format!("{dag}{{{{ ns.x | pprint }}}}"), MEMORY);
    let e = render_error(&format!("{dag}{{{{ ns.x }}}}")).to_string();
    assert!(e.contains("exceeds") || e.contains(MEMORY), "{e}");
    let e = render_error(&format!("{dag}{{{{ ns.x | tojson }}}}")).to_string();
    assert!(
        e.contains(ORIGIN) && e.contains("tojson: the JSON would exceed"),
        "{e}"
    );
}

/// Walks that create nothing (comparison, ordering, hashing, `in`, loops) are charged per
/// element visited: two values with shared parts are small to store but exponential to walk,
/// and a large list walked once per loop step multiplies its length by the fuel.
#[test]
fn r_walks_over_shared_or_large_values_are_bounded() {
    // Distinct lists at every level, so no comparison can stop at "the same object".
    let dags = "{% set ns = namespace(a='x', b='x') %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}";
    for walk in [
        "{{ ns.a == ns.b }}",
        "{{ ns.a != ns.b }}",
        "{{ ns.a < ns.b }}",
        "{{ ns.a in [ns.b] }}",
        "{{ [ns.a, ns.b] | sort | length }}",
        "{{ [ns.a, ns.b] | unique | list | length }}",
        "{{ {ns.a: 1} | length }}",
    ] {
        assert_fails(&format!("{dags}{walk}"), MEMORY);
    }
    // A walk by the template itself costs an instruction per element: the fuel ends it.
    assert_fails(
        &format!(
            "{dags}{{% for x in ns.a recursive %}}{{{{ loop(x) if x is sequence and x is not string }}}}{{% endfor %}}"
        ),
        "ran out of fuel",
    );
    // 10^5 elements walked 10^5 times: each walk is one instruction, the fuel does not see it.
    assert_fails(
        "{% set l = range(100000) | list %}{% for i in range(100000) %}{% if 99999 in l %}{% endif %}{% endfor %}",
        MEMORY,
    );
    assert_fails(
        "{% set l = range(100000) | list %}{% set m = range(100000) | list %}{% for i in range(100000) %}{% if l == m %}{% endif %}{% endfor %}",
        MEMORY,
    );
    // The fuzzer's find (a join of 2^60 one-character leaves).
    assert_fails(
        "{% set ns = namespace(x='x') %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | join(',') }}",
        MEMORY,
    );
}

#[test]
fn r_fuel_and_recursion_are_template_failures() {
    assert_fails(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "ran out of fuel",
    );
    assert_fails(
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "recursed deeper than 100",
    );
    // The template's own rejection of a row is not one, whatever the row says.
    let e =
        render_error("{{ raise_exception('a failure of the template itself, not of this row') }}");
    assert!(!is_template_failure(&e), "{e}");
}

/// A real template is far from every bound.
#[test]
fn real_templates_render_within_the_bounds() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["qwen2", "qwen3", "llama", "smollm2"] {
        let t = ChatTemplate::from_model_dir(&fixtures.join(name)).unwrap();
        let long: Vec<Message> = (0..200)
            .flat_map(|i| {
                [
                    Message::new(Role::User, format!("question {i} {}", "word ".repeat(200))),
                    Message::new(
                        Role::Assistant,
                        format!("answer {i} {}", "word ".repeat(200)),
                    ),
                ]
            })
            .collect();
        let out = t.render(&long, false).unwrap();
        assert!(out.len() > 400 * 1000, "{name}");
    }
}

/// Every row's render runs out of fuel: the preparation stops at the first, naming the template
/// and a row, whatever the error policy, instead of burning the fuel of every row first.
#[test]
fn r_template_failure_stops_the_preparation_at_once() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures.join("qwen2").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let tok = ChatTokenizer::from_model_dir(dir.path()).unwrap();
    let data = dir.path().join("data.jsonl");
    let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n";
    std::fs::write(&data, row.repeat(111)).unwrap();
    // One render that runs out of fuel, for the time it takes here.
    let start = Instant::now();
    let _ = tok.template().render(&[], false);
    let one = start.elapsed();
    for policy in [ErrorPolicy::Skip, ErrorPolicy::Strict] {
        let cfg = DatasetConfig {
            dataset_path: data.clone(),
            max_length: 64,
            load: LoadOptions {
                policy,
                ..LoadOptions::default()
            },
            ..DatasetConfig::default()
        };
        let start = Instant::now();
        let e = prepare(&cfg, &tok, None).unwrap_err().to_string();
        let took = start.elapsed();
        assert!(
            e.contains("chat_template.jinja")
                && e.contains("data.jsonl:")
                && e.contains("ran out of fuel"),
            "{e}"
        );
        // A few renders (one per worker thread at most), not 111.
        assert!(
            took < one * 20,
            "{took:?} for the preparation, {one:?} for one render"
        );
    }
}
