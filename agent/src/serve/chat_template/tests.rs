use super::*;

/// JSON as template values, key order kept.
fn json_value(text: &str) -> minijinja::Value {
    serde_json::from_str(text).unwrap()
}

fn render(source: &str, input: &TemplateInput) -> Result<String, RenderError> {
    ChatTemplate::new(source.to_owned(), vec![("bos_token", "<s>".to_owned())]).unwrap().render(input)
}

#[test]
fn python_string_methods_and_special_tokens_work() {
    let input = TemplateInput {
        messages: message_values(&json_value(r#"[{"role": "user", "content": "  Hi  ", "name": null}]"#)),
        add_generation_prompt: true,
        ..Default::default()
    };
    let source = "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }}{{ m.name is defined }}{% endfor %}{% if add_generation_prompt %}>{% endif %}";
    // Python renders booleans capitalised, and so does minijinja with pycompat.
    assert_eq!(render(source, &input).unwrap(), "<s>USER:HiFalse>");
}

#[test]
fn raise_exception_gives_the_templates_message() {
    let err = render("{{ raise_exception('No system messages, please.') }}", &TemplateInput::default()).unwrap_err();
    assert_eq!(err.0, "No system messages, please.");
}

#[test]
fn kwargs_reach_the_template_but_cannot_replace_messages() {
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("enable_thinking".into(), false.into());
    kwargs.insert("messages".into(), "hijacked".into());
    let input = TemplateInput {
        messages: message_values(&json_value(r#"[{"role": "user", "content": "x"}]"#)),
        kwargs,
        ..Default::default()
    };
    let out = render("{{ enable_thinking }} {{ messages | length }}", &input).unwrap();
    assert_eq!(out, "False 1");
}

#[test]
fn tool_call_arguments_become_objects_for_the_template() {
    let messages = message_values(&json_value(
        r#"[{"role": "assistant", "content": null,
             "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": 2}"}}]}]"#,
    ));
    assert!(messages[0].get_attr("content").unwrap().is_undefined(), "null keys are dropped");
    let input = TemplateInput { messages, ..Default::default() };
    let out = render("{{ messages[0].tool_calls[0].function.arguments | tojson }}", &input).unwrap();
    assert_eq!(out, r#"{"b": 1, "a": 2}"#, "key order is the client's");
}

/// The fixtures' chat templates rendered by transformers (fixtures/reference/chat-*.json),
/// reproduced to the byte, errors included.
fn check_against_transformers(flavour: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let text = std::fs::read_to_string(root.join(format!("reference/chat-{flavour}.json"))).unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    let config_path = root.join(&reference.tokenizer_config);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config_path).unwrap()).unwrap();
    let special_tokens = ["bos_token", "eos_token", "pad_token", "unk_token"]
        .into_iter()
        .filter_map(|name| config[name].as_str().map(|t| (name, t.to_owned())))
        .collect();
    let template = ChatTemplate::new(config["chat_template"].as_str().unwrap().to_owned(), special_tokens).unwrap();
    assert!(reference.cases.len() >= 5, "too few reference cases");
    for case in reference.cases {
        let name = &case.name;
        let input = TemplateInput {
            messages: message_values(&case.messages),
            tools: case.tools.filter(|t| !t.is_none()),
            add_generation_prompt: case.add_generation_prompt,
            kwargs: case.kwargs,
        };
        match (template.render(&input), case.rendered) {
            (Ok(ours), Some(theirs)) => assert_eq!(ours, theirs, "{flavour}/{name}"),
            (Err(ours), None) => assert_eq!(Some(ours.0), case.error, "{flavour}/{name}"),
            (ours, _) => panic!("{flavour}/{name}: transformers and we disagree on success: {ours:?}"),
        }
    }
}

#[derive(serde::Deserialize)]
struct Reference {
    tokenizer_config: String,
    cases: Vec<Case>,
}

/// Messages and tools as template values, so maps keep the file's key order.
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    messages: minijinja::Value,
    tools: Option<minijinja::Value>,
    add_generation_prompt: bool,
    kwargs: serde_json::Map<String, serde_json::Value>,
    rendered: Option<String>,
    error: Option<String>,
}

#[test]
fn chatml_template_matches_transformers() {
    check_against_transformers("chatml");
}

#[test]
fn llama3_template_matches_transformers() {
    check_against_transformers("llama3");
}
