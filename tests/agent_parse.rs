//! The agent's action parser: valid, invalid, multi-line, quotes, unicode, and a proptest that it
//! never panics and that what it accepts round-trips through the canonical form.
use miniwob_steer::agent::parse::{parse_output, MAX_ACTIONS};
use miniwob_steer::env::Action;
use proptest::prelude::*;

fn ok(s: &str) -> Vec<Action> {
    let p = parse_output(s);
    assert!(p.ok(), "{s:?} should parse: {:?}", p.failure);
    p.actions
}

fn bad(s: &str) {
    let p = parse_output(s);
    assert!(!p.ok(), "{s:?} should be a parse failure, got {:?}", p.actions);
    assert!(p.actions.is_empty());
}

#[test]
fn valid_single_actions() {
    assert_eq!(ok("click ref=4"), vec![Action::ClickRef(4)]);
    assert_eq!(ok("CLICK Ref=12"), vec![Action::ClickRef(12)]);
    assert_eq!(ok("  click ref=7  \n"), vec![Action::ClickRef(7)]);
    assert_eq!(ok("type ref=5 text=\"hello world\""), vec![Action::TypeRef { r#ref: 5, text: "hello world".into() }]);
    assert_eq!(ok("Select REF=3 OPTION=\"Betty\""), vec![Action::SelectRef { r#ref: 3, option: "Betty".into() }]);
    assert_eq!(ok("\t\tclick ref=-2"), vec![Action::ClickRef(-2)]);
}

#[test]
fn code_fences() {
    assert_eq!(ok("```\nclick ref=4\n```"), vec![Action::ClickRef(4)]);
    assert_eq!(ok("```text\nclick ref=4\n```\n"), vec![Action::ClickRef(4)]);
    assert_eq!(ok("\n\n  ```plaintext  \n  click ref=9\n  ```"), vec![Action::ClickRef(9)]);
    // An unclosed fence is tolerated too (the model ran out of tokens).
    assert_eq!(ok("```\nclick ref=4"), vec![Action::ClickRef(4)]);
    bad("```click ref=4```");
    bad("`click ref=4`");
}

#[test]
fn multi_line() {
    assert_eq!(
        ok("type ref=5 text=\"abc\"\nclick ref=8\n"),
        vec![Action::TypeRef { r#ref: 5, text: "abc".into() }, Action::ClickRef(8)]
    );
    assert_eq!(ok("click ref=1\n\n\nclick ref=2\r\n"), vec![Action::ClickRef(1), Action::ClickRef(2)]);
    // One bad line spoils the whole answer: strict.
    bad("click ref=1\nand then submit");
    bad("I will click the button.\nclick ref=4");
    let many = "click ref=1\n".repeat(MAX_ACTIONS + 1);
    bad(&many);
    assert_eq!(ok(&"click ref=1\n".repeat(MAX_ACTIONS)).len(), MAX_ACTIONS);
}

#[test]
fn quotes_and_escapes() {
    assert_eq!(
        ok(r#"type ref=2 text="say \"hi\" \\ now""#),
        vec![Action::TypeRef { r#ref: 2, text: "say \"hi\" \\ now".into() }]
    );
    assert_eq!(ok(r#"type ref=2 text="a\nb""#), vec![Action::TypeRef { r#ref: 2, text: "a\nb".into() }]);
    bad(r#"type ref=2 text="unterminated"#);
    bad(r#"type ref=2 text='single'"#);
    bad(r#"type ref=2 text="bad \q escape""#);
    bad(r#"type ref=2 text="x" trailing"#);
}

#[test]
fn unicode() {
    assert_eq!(
        ok("type ref=3 text=\"héllo 中文 🙂\""),
        vec![Action::TypeRef { r#ref: 3, text: "héllo 中文 🙂".into() }]
    );
    assert_eq!(ok("select ref=1 option=\"Zürich\""), vec![Action::SelectRef { r#ref: 1, option: "Zürich".into() }]);
    bad("click ref=４"); // full-width digit
    bad("ｃlick ref=4");
    bad("click\u{00a0}ref=4");
}

#[test]
fn invalid() {
    for s in [
        "",
        "   \n\t\n",
        "Click the button.",
        "click",
        "click ref=",
        "click ref=abc",
        "click ref=4.5",
        "click button",
        "click(ref=4)",
        "click ref = 4",
        "press key=\"Enter\"",
        "none",
        "click x=10 y=20",
        "type text=\"focused\"",
        "type ref=4",
        "select ref=4",
        "drag ref=1",
        "click ref=99999999999999999999",
        "\u{0}",
    ] {
        bad(s);
    }
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        (-50i64..1000).prop_map(Action::ClickRef),
        ((0i64..1000), any::<String>()).prop_map(|(r, text)| Action::TypeRef { r#ref: r, text }),
        ((0i64..1000), any::<String>()).prop_map(|(r, option)| Action::SelectRef { r#ref: r, option }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_string(s in any::<String>()) {
        let p = parse_output(&s);
        prop_assert_eq!(p.ok(), !p.actions.is_empty());
        // Whatever parses round-trips through the canonical form.
        let canon: String = p.actions.iter().map(|a| format!("{a}\n")).collect();
        if p.ok() {
            prop_assert_eq!(parse_output(&canon).actions, p.actions);
        }
    }

    #[test]
    fn never_panics_on_grammar_like_noise(parts in proptest::collection::vec(prop_oneof![
        Just("click".to_string()), Just("type".to_string()), Just("select".to_string()), Just(" ".to_string()),
        Just("ref=".to_string()), Just("text=".to_string()), Just("option=".to_string()), Just("\"".to_string()),
        Just("\\".to_string()), Just("\n".to_string()), Just("```".to_string()), Just("-".to_string()),
        Just("7".to_string()), Just("é🙂".to_string()), Just("\r".to_string()), Just("\t".to_string()),
    ], 0..24)) {
        let s: String = parts.concat();
        let _ = parse_output(&s);
    }

    #[test]
    fn canonical_actions_parse_back(actions in proptest::collection::vec(action_strategy(), 1..=MAX_ACTIONS),
                                    fence in any::<bool>(), pad in "[ \t]{0,3}") {
        let mut text = String::new();
        if fence { text.push_str("```\n"); }
        for a in &actions {
            text.push_str(&format!("{pad}{a}{pad}\n"));
        }
        if fence { text.push_str("```\n"); }
        let p = parse_output(&text);
        prop_assert!(p.ok(), "{:?}: {:?}", text, p.failure);
        prop_assert_eq!(p.actions, actions);
    }
}
