use super::*;

fn hermes() -> Option<&'static ToolParserKind> {
    tool_parser_by_name("hermes")
}

fn parse_whole(text: &str, reasoning: Option<bool>, tools: Option<&ToolParserKind>) -> ParsedMessage {
    parse_chunks(&[text], reasoning, tools)
}

fn parse_chunks(chunks: &[&str], reasoning: Option<bool>, tools: Option<&ToolParserKind>) -> ParsedMessage {
    let mut parser = OutputParser::new(reasoning, tools);
    let mut message = ParsedMessage::default();
    for chunk in chunks {
        message.add(parser.push(chunk));
    }
    message.add(parser.finish());
    message
}

const TRICKY: &[&str] = &[
    "<think>\nplan: call <tool_call> maybe</think>\n\nSure: <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"°C\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>\n",
    "no tags at all, but a < and a </ and <tool and <think",
    "<tool_call>{not json}</tool_call> then text",
    "text <tool_call>{\"name\": \"cut\", \"arguments\": {\"a\": 1}}",
    "<tool_call>{\"name\": \"cut\", \"argu",
    "reasoning without open</think>answer 日本語 <tool_call>{\"name\":\"f\",\"parameters\":{\"x\":[1,2]}}</tool_call>  ",
    "  \n",
];

fn char_boundaries(text: &str) -> Vec<usize> {
    (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect()
}

/// Every parser set-up with every tricky text, and the text's whole-message parse.
fn each_case(mut check: impl FnMut(&str, Option<bool>, Option<&'static ToolParserKind>, &ParsedMessage)) {
    for reasoning in [None, Some(false), Some(true)] {
        for tools in [None, hermes()] {
            for text in TRICKY {
                check(text, reasoning, tools, &parse_whole(text, reasoning, tools));
            }
        }
    }
}

#[test]
fn any_two_way_split_matches_the_whole_text() {
    each_case(|text, reasoning, tools, whole| {
        for cut in char_boundaries(text) {
            let split = parse_chunks(&[&text[..cut], &text[cut..]], reasoning, tools);
            assert_eq!(&split, whole, "text {text:?} cut at {cut} (reasoning {reasoning:?}, tools {tools:?})");
        }
    });
}

#[test]
fn char_by_char_matches_the_whole_text() {
    each_case(|text, reasoning, tools, whole| {
        let bounds = char_boundaries(text);
        let chars: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        assert_eq!(&parse_chunks(&chars, reasoning, tools), whole, "{text:?}");
    });
}

#[test]
fn reasoning_and_tool_calls_are_separated() {
    let parsed = parse_whole(TRICKY[0], Some(false), hermes());
    assert_eq!(parsed.reasoning, "\nplan: call <tool_call> maybe");
    assert_eq!(parsed.content, "\n\nSure:");
    assert_eq!(
        parsed.tool_calls,
        vec![
            ("get_weather".to_owned(), r#"{"city":"Zürich","unit":"°C"}"#.to_owned()),
            ("now".to_owned(), "{}".to_owned())
        ]
    );
}

#[test]
fn without_a_tool_parser_tags_stay_content() {
    let parsed = parse_whole(TRICKY[0], None, None);
    assert_eq!(parsed.content, TRICKY[0]);
    assert!(parsed.tool_calls.is_empty());
}

#[test]
fn invalid_json_in_tags_is_returned_as_content() {
    let parsed = parse_whole(TRICKY[2], None, hermes());
    assert_eq!(parsed.content, "<tool_call>{not json}</tool_call> then text");
    assert!(parsed.tool_calls.is_empty());
}

#[test]
fn an_unclosed_call_is_kept_when_its_json_is_complete() {
    let parsed = parse_whole(TRICKY[3], None, hermes());
    assert_eq!(parsed.content, "text");
    assert_eq!(parsed.tool_calls, vec![("cut".to_owned(), r#"{"a":1}"#.to_owned())]);
    let parsed = parse_whole(TRICKY[4], None, hermes());
    assert_eq!(parsed.content, "<tool_call>{\"name\": \"cut\", \"argu");
    assert!(parsed.tool_calls.is_empty());
}

#[test]
fn generation_that_starts_inside_reasoning() {
    let parsed = parse_whole(TRICKY[5], Some(true), hermes());
    assert_eq!(parsed.reasoning, "reasoning without open");
    assert_eq!(parsed.content, "answer 日本語");
    assert_eq!(parsed.tool_calls, vec![("f".to_owned(), r#"{"x":[1,2]}"#.to_owned())]);
}

#[test]
fn plain_whitespace_answers_survive() {
    assert_eq!(parse_whole("  \n", None, hermes()).content, "  \n");
}

#[test]
fn the_hermes_format_is_detected_from_a_template() {
    assert_eq!(detect_tool_parser("... <tool_call>\n{{ tool_call }} ...").map(|k| k.name), Some("hermes"));
    assert!(detect_tool_parser("{{ messages }}").is_none());
}
