"""Shipping cost calculator (legacy)."""


def cost(weight_kg, zone, express=False):
    """Price in cents of shipping a parcel of weight_kg to zone ("domestic", "eu", "world")."""
    if weight_kg <= 0:
        raise ValueError("weight must be positive")
    if zone == "domestic":
        if weight_kg <= 1:
            price = 450
        else:
            if weight_kg <= 5:
                price = 450 + (weight_kg - 1) * 120
            else:
                if weight_kg <= 20:
                    price = 450 + 4 * 120 + (weight_kg - 5) * 90
                else:
                    raise ValueError("too heavy for this zone")
        if express:
            price = price * 2
    elif zone == "eu":
        if weight_kg <= 1:
            price = 900
        else:
            if weight_kg <= 5:
                price = 900 + (weight_kg - 1) * 250
            else:
                if weight_kg <= 20:
                    price = 900 + 4 * 250 + (weight_kg - 5) * 200
                else:
                    raise ValueError("too heavy for this zone")
        if express:
            price = price * 2
    elif zone == "world":
        if weight_kg <= 1:
            price = 1500
        else:
            if weight_kg <= 5:
                price = 1500 + (weight_kg - 1) * 400
            else:
                if weight_kg <= 10:
                    price = 1500 + 4 * 400 + (weight_kg - 5) * 350
                else:
                    raise ValueError("too heavy for this zone")
        if express:
            price = price * 3
    else:
        raise ValueError("unknown zone: " + str(zone))
    return int(round(price))
