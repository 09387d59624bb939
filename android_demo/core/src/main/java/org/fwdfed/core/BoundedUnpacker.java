package org.fwdfed.core;

import java.io.IOException;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.msgpack.core.MessageFormat;
import org.msgpack.core.MessageFormatException;
import org.msgpack.core.MessageInsufficientBufferException;
import org.msgpack.core.MessageSizeException;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.ValueType;

/**
 * Reads one msgpack value from a frame into plain Java objects, refusing hostile input before
 * it allocates for it: every declared length (string, bytes, array, map) is checked against the
 * bytes left in the frame first, so a 5-byte header that claims 4 GiB of payload is refused
 * without reserving a byte.
 *
 * Values: Long (or BigInteger for an unsigned 64-bit int past Long.MAX_VALUE), Double, String,
 * byte[], Boolean, null, List, and Map with String or byte[] keys (Python's msgpack with
 * strict_map_key accepts only those). Extension types are refused: no field of the protocol
 * takes one.
 */
final class BoundedUnpacker {
    private static final int MAX_DEPTH = 32;  // the protocol's messages nest two deep (a map in a map)

    private final MessageUnpacker unpacker;
    private final long size;

    private BoundedUnpacker(byte[] frame) {
        this.unpacker = MessagePack.newDefaultUnpacker(frame);
        this.size = frame.length;
    }

    /** The single value `frame` holds; trailing bytes after it are refused, as Python's unpackb does. */
    static Object readFrame(byte[] frame) throws ProtocolException {
        BoundedUnpacker reader = new BoundedUnpacker(frame);
        try {
            Object value = reader.read(0);
            if (reader.unpacker.hasNext()) {
                throw new ProtocolException("not valid msgpack: extra data after the value");
            }
            return value;
        } catch (MessageInsufficientBufferException | java.io.EOFException e) {
            throw new ProtocolException("not valid msgpack: the frame ends inside a value");
        } catch (MessageSizeException e) {
            throw new ProtocolException("not valid msgpack: a declared length past 2 GiB");
        } catch (MessageFormatException e) {
            throw new ProtocolException("not valid msgpack: a byte that begins no msgpack value");
        } catch (IOException | RuntimeException e) {  // anything else msgpack-core finds wrong
            throw new ProtocolException("not valid msgpack: unreadable (" + e.getClass().getSimpleName() + ")");
        }
    }

    private long remaining() {
        return size - unpacker.getTotalReadBytes();
    }

    private void claim(long length, long bytesEach, String what) throws ProtocolException {
        if (length < 0 || length * bytesEach > remaining()) {
            throw new ProtocolException("not valid msgpack: " + what + " of length " + length
                    + " is more than the frame holds");
        }
    }

    private Object read(int depth) throws IOException, ProtocolException {
        if (depth > MAX_DEPTH) {
            throw new ProtocolException("not valid msgpack: nested deeper than " + MAX_DEPTH);
        }
        MessageFormat format = unpacker.getNextFormat();
        ValueType type = format.getValueType();
        switch (type) {
            case NIL:
                unpacker.unpackNil();
                return null;
            case BOOLEAN:
                return unpacker.unpackBoolean();
            case INTEGER:
                if (format == MessageFormat.UINT64) {
                    BigInteger big = unpacker.unpackBigInteger();
                    return big.bitLength() < 64 ? (Object) big.longValue() : big;
                }
                return unpacker.unpackLong();
            case FLOAT:
                return unpacker.unpackDouble();
            case STRING: {
                int length = unpacker.unpackRawStringHeader();
                claim(length, 1, "a string");
                return utf8(unpacker.readPayload(length));
            }
            case BINARY: {
                int length = unpacker.unpackBinaryHeader();
                claim(length, 1, "bytes");
                return unpacker.readPayload(length);
            }
            case ARRAY: {
                int count = unpacker.unpackArrayHeader();
                claim(count, 1, "an array");  // every element takes at least one byte
                if (count > Message.MAX_PAIRS) {
                    // No field takes a longer array; refusing here keeps a 64 MiB frame of
                    // one-byte ints from becoming 64M boxed objects.
                    throw new ProtocolException("an array of " + count + " elements is past the protocol's "
                            + Message.MAX_PAIRS);
                }
                List<Object> list = new ArrayList<>(count);
                for (int i = 0; i < count; i++) {
                    list.add(read(depth + 1));
                }
                return list;
            }
            case MAP: {
                int count = unpacker.unpackMapHeader();
                claim(count, 2, "a map");
                Map<Object, Object> map = new LinkedHashMap<>();
                for (int i = 0; i < count; i++) {
                    Object key = read(depth + 1);
                    if (!(key instanceof String) && !(key instanceof byte[])) {
                        throw new ProtocolException("not valid msgpack: a map key must be a string or bytes");
                    }
                    map.put(key, read(depth + 1));  // a repeated key keeps its last value, as a Python dict does
                }
                return map;
            }
            default:
                throw new ProtocolException("not valid msgpack: extension types are not part of the protocol");
        }
    }

    /** Strict UTF-8, as Python's msgpack decodes strings: malformed bytes and encoded surrogates are refused. */
    private static String utf8(byte[] bytes) throws ProtocolException {
        try {
            return StandardCharsets.UTF_8.newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(bytes)).toString();
        } catch (CharacterCodingException e) {
            throw new ProtocolException("not valid msgpack: a string that is not UTF-8");
        }
    }
}
