package org.fwdfed.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * The bundle's tokenizer (its `tokenizer/tokenizer.json` and `tokenizer_config.json`), giving the
 * ids Hugging Face's AutoTokenizer gives for the same folder:
 *
 * 1. special (added) tokens written in the text are split out first and kept whole;
 * 2. each other piece is normalized (BERT's normalizer, or none) and pre-tokenized
 *    (Metaspace: spaces become `▁` and the first piece gets one in front; or BERT's split on
 *    whitespace and punctuation);
 * 3. each word goes through the model (BPE with byte fallback, or WordPiece);
 * 4. the post-processor's template adds the special tokens (`<s>`, or `[CLS]` ... `[SEP]`),
 *    after the sequence was truncated so that the whole fits `maxLength`.
 *
 * Padding (to a fixed length, on the side the tokenizer's class pads: LLaMA's on the left) is
 * {@link BatchEncoder}'s.
 */
public final class Tokenizer {
    private final BpeModel bpe;
    private final WordPieceModel wordPiece;
    private final List<String> addedTexts = new ArrayList<>();
    private final List<Integer> addedIds = new ArrayList<>();
    private final Map<String, Object> normalizer;
    private final Map<String, Object> preTokenizer;
    private final List<Integer> prefixIds = new ArrayList<>();  // the template's special tokens before $A
    private final List<Integer> suffixIds = new ArrayList<>();  // and after it
    public final int padId;
    public final boolean padLeft;

    private Tokenizer(Map<String, Object> json, Map<String, Object> config) {
        Map<String, Object> model = Json.object(json.get("model"), "model");
        String type = (String) model.get("type");
        if ("BPE".equals(type)) {
            bpe = new BpeModel(model);
            wordPiece = null;
        } else if ("WordPiece".equals(type)) {
            wordPiece = new WordPieceModel(model);
            bpe = null;
        } else {
            throw new IllegalArgumentException("tokenizer model " + type + " is not supported (BPE and WordPiece are)");
        }
        Object added = json.get("added_tokens");
        if (added != null) {
            for (Object a : Json.array(added, "added_tokens")) {
                Map<String, Object> token = Json.object(a, "added token");
                addedTexts.add((String) token.get("content"));
                addedIds.add(((Long) token.get("id")).intValue());
            }
        }
        normalizer = json.get("normalizer") == null ? null : Json.object(json.get("normalizer"), "normalizer");
        if (normalizer != null && !"BertNormalizer".equals(normalizer.get("type"))) {
            throw new IllegalArgumentException("normalizer " + normalizer.get("type") + " is not supported");
        }
        preTokenizer = json.get("pre_tokenizer") == null ? null : Json.object(json.get("pre_tokenizer"), "pre_tokenizer");
        if (preTokenizer != null && !"Metaspace".equals(preTokenizer.get("type"))
                && !"BertPreTokenizer".equals(preTokenizer.get("type"))) {
            throw new IllegalArgumentException("pre-tokenizer " + preTokenizer.get("type") + " is not supported");
        }
        if (preTokenizer != null && "Metaspace".equals(preTokenizer.get("type"))
                && Boolean.TRUE.equals(preTokenizer.get("split"))) {
            throw new IllegalArgumentException("a splitting Metaspace pre-tokenizer is not supported");
        }
        readTemplate(json.get("post_processor"));
        String padToken = tokenText(config.get("pad_token"));
        Integer pad = padToken == null ? null : idOf(padToken);
        if (pad == null) {
            throw new IllegalArgumentException("the tokenizer has no pad token the vocabulary knows (" + padToken + ")");
        }
        this.padId = pad;
        Object side = config.get("padding_side");
        String cls = String.valueOf(config.get("tokenizer_class"));
        // transformers' LLaMA tokenizer class pads on the left unless its config says otherwise.
        this.padLeft = side != null ? "left".equals(side) : cls.startsWith("LlamaTokenizer");
    }

    private static String tokenText(Object t) {
        if (t instanceof Map) {
            return (String) ((Map<?, ?>) t).get("content");
        }
        return (String) t;
    }

    private Integer idOf(String token) {
        int i = addedTexts.indexOf(token);
        if (i >= 0) {
            return addedIds.get(i);
        }
        List<Integer> ids = new ArrayList<>();
        model(token, ids);
        return ids.size() == 1 ? ids.get(0) : null;
    }

    private void readTemplate(Object processor) {
        if (processor == null) {
            return;
        }
        Map<String, Object> p = Json.object(processor, "post_processor");
        String type = (String) p.get("type");
        if ("BertProcessing".equals(type)) {
            prefixIds.add(((Long) Json.array(p.get("cls"), "cls").get(1)).intValue());
            suffixIds.add(((Long) Json.array(p.get("sep"), "sep").get(1)).intValue());
            return;
        }
        if (!"TemplateProcessing".equals(type)) {
            throw new IllegalArgumentException("post-processor " + type + " is not supported");
        }
        Map<String, Object> specials = Json.object(p.get("special_tokens"), "special_tokens");
        boolean afterSequence = false;
        for (Object item : Json.array(p.get("single"), "single")) {
            Map<String, Object> entry = Json.object(item, "template item");
            if (entry.containsKey("Sequence")) {
                afterSequence = true;
                continue;
            }
            String name = (String) Json.object(entry.get("SpecialToken"), "SpecialToken").get("id");
            for (Object id : Json.array(Json.object(specials.get(name), name).get("ids"), "ids")) {
                (afterSequence ? suffixIds : prefixIds).add(((Long) id).intValue());
            }
        }
    }

    /** Load `folder/tokenizer.json` and `folder/tokenizer_config.json`. */
    public static Tokenizer load(Path folder) throws IOException {
        Map<String, Object> json = Json.object(Json.parse(read(folder.resolve("tokenizer.json"))), "tokenizer.json");
        Path configPath = folder.resolve("tokenizer_config.json");
        Map<String, Object> config = Files.isRegularFile(configPath)
                ? Json.object(Json.parse(read(configPath)), "tokenizer_config.json") : Collections.emptyMap();
        return new Tokenizer(json, config);
    }

    private static String read(Path path) throws IOException {
        return new String(Files.readAllBytes(path), StandardCharsets.UTF_8);
    }

    /** The ids of `text` with the template's special tokens, truncated on the right to at most `maxLength`. */
    public int[] encode(String text, int maxLength) {
        List<Integer> ids = new ArrayList<>();
        int at = 0;
        int pieceStart = 0;
        while (at < text.length()) {
            int match = -1;
            for (int k = 0; k < addedTexts.size(); k++) {  // the longest added token starting here
                String t = addedTexts.get(k);
                if (!t.isEmpty() && text.startsWith(t, at) && (match < 0 || t.length() > addedTexts.get(match).length())) {
                    match = k;
                }
            }
            if (match < 0) {
                at++;
                continue;
            }
            piece(text.substring(pieceStart, at), pieceStart == 0, ids);
            ids.add(addedIds.get(match));
            at += addedTexts.get(match).length();
            pieceStart = at;
        }
        piece(text.substring(pieceStart), pieceStart == 0, ids);
        int room = Math.max(0, maxLength - prefixIds.size() - suffixIds.size());
        List<Integer> kept = ids.size() > room ? ids.subList(0, room) : ids;
        int[] out = new int[prefixIds.size() + kept.size() + suffixIds.size()];
        int i = 0;
        for (int id : prefixIds) {
            out[i++] = id;
        }
        for (int id : kept) {
            out[i++] = id;
        }
        for (int id : suffixIds) {
            out[i++] = id;
        }
        return out;
    }

    /** One stretch of text between added tokens: normalize, pre-tokenize, run the model. */
    private void piece(String text, boolean atStart, List<Integer> ids) {
        if (text.isEmpty()) {
            return;
        }
        if (normalizer != null) {
            boolean lowercase = !Boolean.FALSE.equals(normalizer.get("lowercase"));
            Object strip = normalizer.get("strip_accents");
            text = BertText.normalize(text, !Boolean.FALSE.equals(normalizer.get("clean_text")),
                    !Boolean.FALSE.equals(normalizer.get("handle_chinese_chars")),
                    strip == null ? lowercase : Boolean.TRUE.equals(strip), lowercase);
        }
        if (preTokenizer == null) {
            model(text, ids);
        } else if ("Metaspace".equals(preTokenizer.get("type"))) {
            String replacement = (String) preTokenizer.get("replacement");
            String scheme = String.valueOf(preTokenizer.get("prepend_scheme"));
            String word = text.replace(" ", replacement);
            boolean prepend = "always".equals(scheme) || ("first".equals(scheme) && atStart);
            if (prepend && !word.startsWith(replacement)) {
                word = replacement + word;
            }
            model(word, ids);
        } else {
            for (String word : BertText.preTokenize(text)) {
                model(word, ids);
            }
        }
    }

    private void model(String word, List<Integer> ids) {
        if (bpe != null) {
            bpe.tokenize(word, ids);
        } else {
            wordPiece.tokenize(word, ids);
        }
    }
}
