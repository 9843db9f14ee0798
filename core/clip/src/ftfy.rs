//! The deterministic subset of `ftfy.fix_text` (ftfy 6, default config) that changes ordinary
//! text, applied in ftfy's order:
//!
//! 1. `fix_latin_ligatures`: ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ Ĳ ĳ ŉ Ǆ ǅ ǆ Ǉ ǈ ǉ Ǌ ǋ ǌ → their NFKC letters;
//! 2. `fix_character_width`: U+FF01..U+FFEF → NFKC (fullwidth ASCII → ASCII, halfwidth
//!    katakana → fullwidth), U+3000 → space;
//! 3. `uncurl_quotes`: U+02BC, U+2018..U+201B → `'`; U+201C..U+201F → `"`;
//! 4. `fix_line_breaks`: CRLF, CR, U+2028, U+2029, U+0085 → LF;
//! 5. `remove_control_chars`: U+0000..U+0008, U+000B, U+000E..U+001F, U+007F, U+206A..U+206F,
//!    U+FEFF, U+FFF9..U+FFFC removed;
//! 6. NFC.
//!
//! NOT replicated (text that needs them is tokenised differently from open_clip): mojibake
//! repair (`fix_encoding`, `restore_byte_a0`, `replace_lossy_sequences`,
//! `decode_inconsistent_utf8`), `fix_c1_controls` (U+0080..U+009F read as windows-1252),
//! `remove_terminal_escapes` (ANSI `ESC[...m`: we drop only the ESC itself) and
//! `fix_surrogates` (a Rust `str` holds no surrogates). ftfy's own HTML unescaping is subsumed
//! by open_clip's `html.unescape` twice (see tokenizer.rs for the entities handled).
use unicode_normalization::UnicodeNormalization;

fn nfkc_char(c: char, out: &mut String) {
    out.extend(std::iter::once(c).nfkc());
}

fn is_removed_control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

/// See the module documentation for exactly what is and is not done.
pub fn fix_text(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            'ﬀ'..='ﬆ' | 'Ĳ' | 'ĳ' | 'ŉ' | 'Ǆ'..='ǌ' => nfkc_char(c, &mut s),
            '\u{3000}' => s.push(' '),
            '\u{FF01}'..='\u{FFEF}' => nfkc_char(c, &mut s),
            '\u{02BC}' | '\u{2018}'..='\u{201B}' => s.push('\''),
            '\u{201C}'..='\u{201F}' => s.push('"'),
            _ => s.push(c),
        }
    }
    let s = s.replace("\r\n", "\n");
    let s: String = s
        .chars()
        .map(|c| if matches!(c, '\r' | '\u{2028}' | '\u{2029}' | '\u{0085}') { '\n' } else { c })
        .filter(|&c| !is_removed_control(c))
        .collect();
    s.nfc().collect()
}
