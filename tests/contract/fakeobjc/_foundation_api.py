"""Signatures of the Foundation selectors the API data lists (``foundation_used``).

``api.json`` names the Foundation selectors a client needs but gives no types, and
``nullability.json`` does not cover them; these are the declarations of Apple's Foundation
headers (``NSURL.h``, ``NSData.h``, ``NSFileHandle.h``, ``NSError.h``, ``NSRunLoop.h``,
``NSDate.h``, ``NSProgress.h``, ``NSUUID.h``, ``NSFileManager.h``), written the way the API
data writes types. They only *type* selectors the data lists: a selector missing from the
data does not exist, whatever this table says (a test pins the two to each other).

Each entry reads ``"result <- argument, argument"``. A pointer type is nonnull unless it ends
in ``?`` (as in the headers' audited regions); the kinds in :data:`NOT_POINTERS` have no
nullability.
"""

from __future__ import annotations

NOT_POINTERS = frozenset(
    {"BOOL", "int", "NSInteger", "NSUInteger", "int64_t", "double", "NSTimeInterval", "void"}
    | {"NSError**"}
)

SIGNATURES: dict[str, dict[str, str]] = {
    "NSURL": {
        "+fileURLWithPath:": "NSURL <- NSString",
        "+fileURLWithPath:isDirectory:": "NSURL <- NSString, BOOL",
        "+URLWithString:": "NSURL? <- NSString",
        "-path": "NSString?",
        "-absoluteString": "NSString?",
        "-isFileURL": "BOOL",
        "-URLByAppendingPathComponent:": "NSURL? <- NSString",
        "-fileSystemRepresentation": "const char*",
        "-checkResourceIsReachableAndReturnError:": "BOOL <- NSError**",
    },
    "NSData": {
        "+data": "NSData",
        "+dataWithBytes:length:": "NSData <- const void*?, NSUInteger",
        "+dataWithContentsOfURL:": "NSData? <- NSURL",
        "-bytes": "const void*?",  # NULL for empty data
        "-length": "NSUInteger",
        "-writeToURL:atomically:": "BOOL <- NSURL, BOOL",
    },
    "NSFileHandle": {
        "+fileHandleForReadingAtPath:": "NSFileHandle? <- NSString",
        "+fileHandleForWritingAtPath:": "NSFileHandle? <- NSString",
        "+fileHandleForUpdatingAtPath:": "NSFileHandle? <- NSString",
        "+fileHandleWithNullDevice": "NSFileHandle",
        "+fileHandleWithStandardInput": "NSFileHandle",
        "+fileHandleWithStandardOutput": "NSFileHandle",
        "-initWithFileDescriptor:": "NSFileHandle <- int",
        "-initWithFileDescriptor:closeOnDealloc:": "NSFileHandle <- int, BOOL",
        "-fileDescriptor": "int",
        "-closeFile": "void",
        "-closeAndReturnError:": "BOOL <- NSError**",
        "-readDataToEndOfFile": "NSData",
        "-availableData": "NSData",
        "-writeData:": "void <- NSData",
    },
    "NSError": {
        "+errorWithDomain:code:userInfo:": (
            "NSError <- NSString, NSInteger, NSDictionary<NSString,id>?"
        ),
        "-domain": "NSString",
        "-code": "NSInteger",
        "-userInfo": "NSDictionary<NSString,id>",
        "-localizedDescription": "NSString",
        "-localizedFailureReason": "NSString?",
        "-localizedRecoverySuggestion": "NSString?",
        "-underlyingErrors": "NSArray<NSError>",
    },
    "NSRunLoop": {
        "+currentRunLoop": "NSRunLoop",
        "+mainRunLoop": "NSRunLoop",
        "-run": "void",
        "-runUntilDate:": "void <- NSDate",
        "-runMode:beforeDate:": "BOOL <- NSString, NSDate",
    },
    "NSDate": {
        "+date": "NSDate",
        "+dateWithTimeIntervalSinceNow:": "NSDate <- NSTimeInterval",
        "+distantFuture": "NSDate",
    },
    "NSProgress": {
        "-fractionCompleted": "double",
        "-completedUnitCount": "int64_t",
        "-totalUnitCount": "int64_t",
        "-isFinished": "BOOL",
        "-isCancelled": "BOOL",
        "-cancel": "void",
    },
    "NSUUID": {
        "+UUID": "NSUUID",
        "-initWithUUIDString:": "NSUUID? <- NSString",
        "-UUIDString": "NSString",
    },
    "NSFileManager": {
        "+defaultManager": "NSFileManager",
        "-fileExistsAtPath:": "BOOL <- NSString",
        "-removeItemAtURL:error:": "BOOL <- NSURL, NSError**",
    },
}


def _kind(text: str) -> tuple[str, bool | None]:
    text = text.strip()
    if text.endswith("?"):
        return text[:-1], True
    return text, (None if text in NOT_POINTERS else False)


def signature(
    cls: str, selector: str, *, is_class: bool
) -> tuple[tuple[tuple[str, bool | None], ...], tuple[str, bool | None]] | None:
    """``((argument kind, nullable), ...), (result kind, nullable)`` or ``None`` if unknown."""
    entry = SIGNATURES.get(cls, {}).get(("+" if is_class else "-") + selector)
    if entry is None:
        return None
    result, _, args = entry.partition("<-")
    # split on ", " outside <...> (NSDictionary<NSString,id> has no space after its comma)
    parts = [_kind(a) for a in args.split(", ")] if args.strip() else []
    return tuple(parts), _kind(result)
