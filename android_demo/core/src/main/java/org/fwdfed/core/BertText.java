package org.fwdfed.core;

import java.text.Normalizer;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/**
 * BERT's normalizer and pre-tokenizer as the `tokenizers` library defines them: clean the text
 * (drop NUL, U+FFFD and control characters, whitespace to a space), put spaces around CJK
 * ideographs, strip accents (NFD, drop non-spacing marks), lowercase; then split on whitespace
 * and make every punctuation character a word of its own.
 */
final class BertText {
    private BertText() {}

    static String normalize(String text, boolean cleanText, boolean chineseChars, boolean stripAccents,
                            boolean lowercase) {
        StringBuilder out = new StringBuilder();
        text.codePoints().forEach(cp -> {
            if (cleanText) {
                if (cp == 0 || cp == 0xFFFD || isControl(cp)) {
                    return;
                }
                if (isWhitespace(cp)) {
                    out.append(' ');
                    return;
                }
            }
            if (chineseChars && isChinese(cp)) {
                out.append(' ').appendCodePoint(cp).append(' ');
                return;
            }
            out.appendCodePoint(cp);
        });
        String s = out.toString();
        if (stripAccents) {
            StringBuilder kept = new StringBuilder();
            Normalizer.normalize(s, Normalizer.Form.NFD).codePoints().forEach(cp -> {
                if (Character.getType(cp) != Character.NON_SPACING_MARK) {
                    kept.appendCodePoint(cp);
                }
            });
            s = kept.toString();
        }
        if (lowercase) {
            // Per character, as Rust's char::to_lowercase: no context rules (Java's final sigma).
            StringBuilder lower = new StringBuilder();
            s.codePoints().forEach(cp -> lower.append(new String(Character.toChars(cp)).toLowerCase(Locale.ROOT)));
            s = lower.toString();
        }
        return s;
    }

    static List<String> preTokenize(String text) {
        List<String> words = new ArrayList<>();
        StringBuilder word = new StringBuilder();
        text.codePoints().forEach(cp -> {
            if (isWhitespace(cp)) {
                flush(word, words);
            } else if (isPunctuation(cp)) {
                flush(word, words);
                words.add(new String(Character.toChars(cp)));
            } else {
                word.appendCodePoint(cp);
            }
        });
        flush(word, words);
        return words;
    }

    private static void flush(StringBuilder word, List<String> words) {
        if (word.length() > 0) {
            words.add(word.toString());
            word.setLength(0);
        }
    }

    /** Rust's char::is_whitespace (the Unicode White_Space property). */
    static boolean isWhitespace(int cp) {
        return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680
                || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F
                || cp == 0x3000;
    }

    /** General category C (other), but tab, newline and carriage return count as whitespace. */
    static boolean isControl(int cp) {
        if (cp == '\t' || cp == '\n' || cp == '\r') {
            return false;
        }
        int t = Character.getType(cp);
        return t == Character.CONTROL || t == Character.FORMAT || t == Character.SURROGATE
                || t == Character.PRIVATE_USE || t == Character.UNASSIGNED;
    }

    static boolean isPunctuation(int cp) {
        if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126)) {
            return true;
        }
        int t = Character.getType(cp);
        return t == Character.CONNECTOR_PUNCTUATION || t == Character.DASH_PUNCTUATION
                || t == Character.START_PUNCTUATION || t == Character.END_PUNCTUATION
                || t == Character.INITIAL_QUOTE_PUNCTUATION || t == Character.FINAL_QUOTE_PUNCTUATION
                || t == Character.OTHER_PUNCTUATION;
    }

    static boolean isChinese(int cp) {
        return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF)
                || (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F)
                || (cp >= 0x2B920 && cp <= 0x2CEAF) || (cp >= 0xF900 && cp <= 0xFAFF)
                || (cp >= 0x2F800 && cp <= 0x2FA1F);
    }
}
