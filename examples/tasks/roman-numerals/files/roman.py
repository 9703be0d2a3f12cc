"""Roman numerals (standard subtractive form, 1 to 3999)."""


def to_roman(number):
    """Return the Roman numeral for an int from 1 to 3999, e.g. to_roman(1994) == "MCMXCIV".

    Raises ValueError for ints outside 1..3999 and TypeError for anything that is not an int
    (bool included).
    """
    raise NotImplementedError


def from_roman(numeral):
    """Return the int value of a Roman numeral string, e.g. from_roman("MCMXCIV") == 1994.

    Upper or lower case letters are accepted ("xiv" == 14). Only the canonical form is valid:
    "IIII", "IC", "VX", "MMMM" and "" are not numerals and raise ValueError, as does any other
    character. Raises TypeError for non-strings.
    """
    raise NotImplementedError
